-- POST /items with a JSON body, for bench/realistic.py (bench/apps/fastapi_json.py).
-- bench/realistic.py reads wrk.body from this line to check each server's answer with the same body.
wrk.method = "POST"
wrk.path = "/items"
wrk.body = '{"name": "blue widget", "price": 12.5, "tags": ["Tools", "home", "sale", "home"]}'
wrk.headers["Content-Type"] = "application/json"
