"""The retrieval service: a caption in any language of an exported model in, the best images of an index out.

    service.py   the Ray-free core: runtime encoder + image index + image store, input checks and limits, the
                 batched search / encode calls (the benchmark's in-process baseline runs exactly this)
    images.py    image ids -> encoded images of a dataset folder (thumbnails for the search page), and upload
                 decoding with byte and pixel limits
    page.py      the search page (`GET /`): plain HTML and inline CSS, no script or font from anywhere
    batching.py  request batching that costs nothing when there is nothing to batch (a lone request starts at
                 once; a batch takes what waits while the worker computes)
    app.py       the Ray Serve application: a FastAPI ingress whose replicas hold one service each and batch
                 requests (batching.py); `build_app(args)` is the Serve config's import path
    ray_env.py   Serve's environment: start-up timeouts, HAProxy as the ingress (replicas serve HTTP themselves)
    haproxy_bind.py  starts Serve's HAProxy with its side listeners on the service's address (loopback)

Imports neither torch, open_clip nor transformers (tests/unit/test_layering.py checks), so a serving install
(`pip install 'ccr-ray[serve]'`) runs it. Start it with `python export/serve.py --model DIR --index DIR`.
"""
