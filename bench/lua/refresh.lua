-- Each wrk thread owns one connection and one refresh-token chain: it sends its current token
-- and takes the successor from each response, as a real client does.
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("index", counter)
  table.insert(threads, thread)
end

function init(args)
  local file = io.open(os.getenv("AUTHGATE_BENCH_TOKENS"))
  local n = 0
  for line in file:lines() do
    n = n + 1
    if n == index then token = line end
  end
  file:close()
  failures = 0
end

function request()
  return wrk.format("POST", nil, {["Content-Type"] = "application/x-www-form-urlencoded"},
                    "grant_type=refresh_token&refresh_token=" .. token)
end

function response(status, headers, body)
  local next_token = body:match('"refresh_token":"([^"]+)"')
  if status == 200 and next_token then
    token = next_token
  else
    failures = failures + 1
  end
end
