-- GET with a fixed bearer token (AUTHGATE_BENCH_TOKEN).
wrk.headers["Authorization"] = "Bearer " .. os.getenv("AUTHGATE_BENCH_TOKEN")
