-- The gate's `lua.replica_key` action: replace the client's Authorization (the pool credential)
-- with this replica's TorchServe inference key, read from key_file.json on every request.
-- TorchServe rewrites that file in place (truncate, then write), so a read that finds no key keeps
-- the last key read; the file is a few hundred bytes in the pod's own emptyDir.
-- While the entrypoint's renewer replaces the inference key it writes key_file.json.renewing (a
-- deadline, epoch seconds): TorchServe rejects the old key at once, so a new request waits here
-- until the file is gone (milliseconds), and never longer than its deadline or HOLD_WAIT_MS.
local key_file = os.getenv("FLYWHEEL_TS_KEY_FILE") or "/opt/flywheel/run/key_file.json"
local hold_file = key_file .. ".renewing"
local HOLD_WAIT_MS = 2000
local last_key = nil

local function held()
    local f = io.open(hold_file, "r")
    if f == nil then
        return false
    end
    local deadline = tonumber(f:read("*l") or "")
    f:close()
    return deadline == nil or os.time() <= deadline
end

local function read_key()
    local f = io.open(key_file, "r")
    if f == nil then
        return nil
    end
    local text = f:read("*a")
    f:close()
    return string.match(text or "", '"inference"%s*:%s*{[^}]-"key"%s*:%s*"([^"]+)"')
end

core.register_action("replica_key", {"http-req"}, function(txn)
    local waited = 0
    while waited < HOLD_WAIT_MS and held() do
        core.msleep(2)
        waited = waited + 2
    end
    local key = read_key() or last_key
    if key ~= nil then
        last_key = key
        txn.http:req_set_header("Authorization", "Bearer " .. key)
    else
        -- TorchServe has not written its keys yet: it is not serving either, so it answers 4xx/503.
        txn.http:req_del_header("Authorization")
    end
end, 0)
