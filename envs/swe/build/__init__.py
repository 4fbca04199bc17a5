"""Making SWE tasks here, without GitHub or an image registry: from a PyPI sdist by bug injection
(`tasks`, `mutate`, `statement`), and SWE-bench instances stood in for by an sdist
(`swebench_sdist`)."""
