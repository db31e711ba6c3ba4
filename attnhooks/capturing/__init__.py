"""Where the model runs: a capture session sees attention calls (``intercept/``), keeps their KV-cache
streams (``kvcache``, ``streams``) and builds records (``recorder``, ``record``), staged off the hot
path (``staging``). Imports torch; never imports ``write``, ``read`` or a backend: records leave
through the :class:`~attnhooks.capturing.recorder.Listener` the session is handed."""
