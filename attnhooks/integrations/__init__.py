"""attnhooks inside training scripts: callbacks for the Hugging Face ``Trainer`` and PyTorch Lightning.

Both callbacks capture one optimizer step in ``every`` (the micro-batches of a gradient-accumulation
step are calls of that one step), optionally evaluation passes (kept apart: their own store and
their own metric names), stream to a store when given one (its steps are the trainer's global steps)
and compute per-head metrics from the captured attention, logged through the trainer's loggers
(TensorBoard, Weights & Biases, accelerate's trackers) as per-head scalars and a layer x head figure.

* :mod:`attnhooks.integrations.hf`: ``AttnHooksCallback``, a ``transformers.TrainerCallback``.
* :mod:`attnhooks.integrations.lightning`: ``AttnHooksCallback``, a ``pytorch_lightning.Callback``.
* :mod:`attnhooks.integrations.windows`: what both share: one capture per captured step, the
  compiled-model rule (a captured step runs the model eagerly; the compiled graph serves the others).
* :mod:`attnhooks.integrations.metrics`: records -> per-head metrics (:mod:`attnhooks.analysis.heads`).
* :mod:`attnhooks.integrations.loggers`: TensorBoard / W&B / accelerate sinks and the grid figure.

Nothing here is imported by ``import attnhooks``; each module imports its trainer library when used.
"""

__all__: list[str] = []
