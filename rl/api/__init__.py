"""The dashboard: a read-only FastAPI app over a runs directory (`app`), its data access (`runs`),
serving it (`server`) and the web page with its vendored chart library (`static/`)."""
