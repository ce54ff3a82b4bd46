"""Continue the toy adapter past the packaged 1,500 steps in a separate folder (same recipe, resumed)."""
import sys, torch
torch.set_num_threads(1); torch.set_flush_denormal(True)
from imprompt.toy import build as B, shapes
from imprompt.training.config import TrainConfig
from imprompt.training.trainer import train
cfg = B.BuildConfig()
p = cfg.work / "pipeline"
config = TrainConfig(model=str(p), image_encoder=str(p / "image_encoder"), data=str(cfg.work / "data" / "train"),
                     output_dir=str(cfg.work / "adapter" / "run-continued"), cache_dir=str(cfg.work / "adapter" / "run" / "cache"),
                     variant="linear", resolution=32, batch_size=64, max_steps=int(sys.argv[1]), learning_rate=cfg.adapter_lr,
                     checkpoint_every=200, resume="latest", seed=cfg.seed, cpu=True)
train(config)
