"""A/B only: fp16 for the pooled-embedding all-to-all (both directions) and the DDP all-reduce."""

import os

if os.environ.get("CTCVR_AB_QCOMMS") == "1":
    import torchrec.distributed.model_parallel as mp
    import torchrec.distributed.sharding_plan as sp
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.fbgemm_qcomm_codec import (
        CommType,
        QCommsConfig,
        get_qcomm_codecs_registry,
    )

    _orig = sp.get_default_sharders

    def get_default_sharders():
        registry = get_qcomm_codecs_registry(
            QCommsConfig(forward_precision=CommType.FP16, backward_precision=CommType.FP16)
        )
        return [EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)] + [
            s for s in _orig() if not isinstance(s, EmbeddingBagCollectionSharder)
        ]

    sp.get_default_sharders = get_default_sharders
    _init = mp.DefaultDataParallelWrapper.__init__

    def __init__(self, *a, **k):
        _init(self, *a, **k)
        if os.environ.get("CTCVR_AB_DDP_FP16") == "1":
            self._allreduce_comm_precision = "fp16"

    mp.DefaultDataParallelWrapper.__init__ = __init__
