"""Methods added to every vLLM worker process (`worker_extension_cls`), called through
`collective_rpc`. They run inside the engine's worker, next to the model."""

from __future__ import annotations


class WeightSyncExtension:
    """In-place weight reload that also refreshes a tied output head."""

    def load_pushed_weights(self, path: str) -> None:
        """Reload every weight from the checkpoint directory `path`.

        With tied embeddings the checkpoint has no `lm_head.weight`, so vLLM's layerwise reload
        never finalises the output head. On CPU that head multiplies with a pre-packed copy of the
        embedding made at load time (`cpu_linear`), which then keeps the *old* weights: measured
        0.4 nats of logprob error after one update. Re-running the head's post-load processing
        re-packs it from the freshly loaded, shared embedding."""
        self.reload_weights(weights_path=path, is_checkpoint_format=True)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        config = getattr(model, "config", None)
        head = getattr(model, "lm_head", None)
        if getattr(config, "tie_word_embeddings", False) and head is not None:
            method = getattr(head, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(head)
