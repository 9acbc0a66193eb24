-- POST /oauth/token, grant_type=password. Each wrk thread owns one connection and signs in a
-- user of its own, as a server's concurrent sign-ins come from different users (one login id
-- admits only its free attempts at once: see core/throttle.py).
local own = require("own")

local function urlencode(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

setup = own.number_threads

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.body = "grant_type=password&username="
    .. urlencode(own.own_line(os.getenv("AUTHGATE_BENCH_EMAILS")))
    .. "&password=" .. urlencode(os.getenv("AUTHGATE_BENCH_PASSWORD"))
end
