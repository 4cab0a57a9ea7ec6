# Local-only GCS emulator (compose profile "gcs-emulator"); production uses a real bucket.
FROM python:3.11-slim
RUN pip install --no-cache-dir "gcp-storage-emulator==2026.7.19" \
    && useradd --system --create-home --uid 10002 gcs
USER 10002
WORKDIR /home/gcs
EXPOSE 9023
ENTRYPOINT ["gcp-storage-emulator", "-d", "/home/gcs/data", "start", "--host", "0.0.0.0", "--port", "9023"]
