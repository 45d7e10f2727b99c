"""`edje serve`: the HTTP rerank service (`app`), its cross-request batching (`batching`) and
the request checks (`requests`)."""
