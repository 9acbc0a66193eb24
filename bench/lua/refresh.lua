-- Each wrk thread owns one connection and one refresh-token chain: it sends its current token
-- and takes the successor from each response, as a real client does.
local own = require("own")

setup = own.number_threads

function init(args)
  token = own.own_line(os.getenv("AUTHGATE_BENCH_TOKENS"))
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
