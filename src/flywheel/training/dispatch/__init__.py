"""`flywheel remote-train`: ship one commit to a training node over SSH and `mlflow run` it there.

The contract: the CI runner (or a person) names a project (path or git URL), a commit, the MLproject's
directory in it and a pool of nodes; the commit's tree, and nothing else of the repository, is run
(`mlflow run <dir>`) detached on the node with the most free GPU memory, by the node's own `mlflow`,
logging to the tracking server; the client streams the job's log and exits with the job's exit
code. The job outlives the SSH session (reattach with `--attach`, stop it with `--cancel`), one
commit of one project dir never trains twice at once on a node, secrets never reach a command line or
a log, and host keys are checked against a known_hosts file and never added.

One job per module, imported by its own path (this package re-exports nothing):
* `nodes`: the inventory (`Node`, nodes.yaml) and picking a node (probe, rank, pick);
* `ssh`: authentication (`SSHAuth`), connecting, exec and SFTP helpers, `NodeUnreachable`;
* `source`: the project (a checkout's path or a git URL, fetched here, and the MLproject's directory
  in it) and the commit (resolve it, `git archive` it, check its MLproject entry point);
* `job`: the request (`RemoteTrainConfig`), the job's env and scripts, its lifecycle (`RemoteJob`,
  `remote_train`, `find_job`/`find_jobs`, `attach`);
* `multinode`: `--num-nodes N`, one torchrun job across N nodes (choose and order them, each one's
  part of the rendezvous, the other nodes' entry command, follow all; node side:
  flywheel.component.distributed);
* `report`: the run against the champion as Markdown/JSON and GitHub outputs (`flywheel report`);
* `command`: the `remote-train` verb's plumbing (`CommandOptions`, `run_command`).
"""
