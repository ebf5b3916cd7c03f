"""`treespec-train-head`: the Hydra app that trains a draft head for a target (treespec.heads.pipeline).

    treespec-train-head target=qwen2.5-coder-1.5b-instruct device=cuda max_minutes=8
    treespec-train-head train_head=tiny                     # the tiny cycle model on the CPU, seconds
    treespec-train-head target=... data.text_dir=my_texts/ data.packages=false train.unroll=1

(`python -m treespec.heads.cli ...` works the same.) The config is treespec/configs/train_head.yaml plus
one recipe from the `train_head` group (treespec/configs/train_head/: `default` for a real target on a
GPU, `tiny` for the tiny test models); docs/configs.md documents every key. This is the only
heads module that imports Hydra: the composed config becomes a typed HeadTrainConfig (unknown
keys and wrong types fail at compose time) and the library does the rest.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from treespec.bench.config import CONFIG_DIR
from treespec.heads.pipeline import HeadTrainConfig, run

ConfigStore.instance().store(name="train_head_schema", node=HeadTrainConfig)


def to_config(cfg: DictConfig) -> HeadTrainConfig:
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, HeadTrainConfig):
        raise ValueError("the config does not start from train_head_schema (add `- train_head_schema` to its defaults)")
    return obj


@hydra.main(config_path=str(CONFIG_DIR), config_name="train_head", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = to_config(cfg)
    except ValueError as err:
        print(f"treespec-train-head: {err}", file=sys.stderr)
        sys.exit(2)
    run(config)


if __name__ == "__main__":
    main()
