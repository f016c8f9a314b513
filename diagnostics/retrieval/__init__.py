"""Retrieval: how much a model uses context far back (the front door; docs/retrieval.md).

    _passkey   random keys planted at a depth in held-out text and repeated at the end of the
               context (``draw_keys``, ``plant_keys``, ``check_depths``), the loss on the repeated key
               (``key_logits``, ``repeated_key_loss``) and the retrieval gain, unplanted - planted
               (``retrieval_gain``)

    from diagnostics.retrieval import plant_keys, retrieval_gain
"""

from diagnostics.retrieval._passkey import (check_depths, draw_keys, key_logits, plant_keys, repeated_key_loss,
                                            retrieval_gain)

__all__ = ["check_depths", "draw_keys", "key_logits", "plant_keys", "repeated_key_loss", "retrieval_gain"]
