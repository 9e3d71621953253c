-- wrk script of bench_serve.py: POST /v1/predict with bodies read from $WRK_BODIES (one JSON per
-- line), each connection thread starting at its own offset; prints one machine-readable summary line.
local bodies = {}
local n = 0
local i = 0
for line in io.lines(os.getenv("WRK_BODIES")) do
  n = n + 1
  bodies[n] = line
end

local threads = 0
function setup(thread)
  thread:set("offset", threads * 7919)
  threads = threads + 1
end

function init(args)
  i = tonumber(offset) or 0
end

function request()
  i = i % n + 1
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"}, bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
