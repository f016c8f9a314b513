import pytest

from midtrain.config import Phase, TrainConfig


def micro_config(steps=(8, 6, 4), **kw) -> TrainConfig:
    """A three-phase recipe on a very small model: seconds on CPU."""
    cfg = TrainConfig(
        seed=kw.pop("seed", 0),
        eval_every=kw.pop("eval_every", 5),
        checkpoint_every=kw.pop("checkpoint_every", 5),
        phases=[
            Phase(name="pretrain", steps=steps[0], lr=3e-3, warmup_steps=2, mixture={"prose": 0.6, "code": 0.3, "math": 0.1},
                  batch_size=8, grad_accum=2, seq_len=32),
            Phase(name="midtrain", steps=steps[1], lr=3e-3, decay="1-sqrt", final_lr=3e-4,
                  mixture={"prose": 0.2, "code": 0.4, "math": 0.4}, batch_size=8, seq_len=32),
            Phase(name="long_context", steps=steps[2], lr=3e-4, decay="linear", final_lr=3e-5,
                  mixture={"prose": 0.3, "code": 0.35, "math": 0.35}, batch_size=4, seq_len=64, rope_base=40000.0),
        ],
    )
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 2, 2, 32, 128
    cfg.data.eval_batches, cfg.data.eval_batch_size = 1, 4
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def micro_cfg():
    return micro_config()
