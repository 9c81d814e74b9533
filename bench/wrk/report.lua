-- Shared by the benchmark's wrk scripts: done() writes the run's numbers as JSON to the
-- file named by $WRK_REPORT (latencies in microseconds), for bench/run.py to read.
local report = {}

local PERCENTILES = {1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95, 97.5, 99, 99.5, 99.9,
                     99.99, 100}

function report.done(summary, latency, requests)
  local path = os.getenv("WRK_REPORT")
  if path == nil or path == "" then
    return
  end
  local parts = {}
  for _, p in ipairs(PERCENTILES) do
    parts[#parts + 1] = string.format('["%s", %d]', tostring(p), latency:percentile(p))
  end
  local e = summary.errors
  local f = assert(io.open(path, "w"))
  f:write(string.format(
    '{"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "max": %d, "mean": %.1f, "stdev": %.1f, ' ..
    '"percentiles": [%s]}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(parts, ", ")))
  f:close()
end

return report
