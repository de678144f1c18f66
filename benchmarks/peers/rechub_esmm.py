"""torch-rechub 0.9.0's ESMM in the peer benchmark (run with .venv-peers by
benchmarks/peer_throughput.py), used as its documentation shows: SparseFeature columns,
DataGenerator -> DataLoader over in-memory arrays, MTLTrainer (Adam) whose
``train_one_epoch`` runs the steps (the loader is cut after the timed window in throughput
mode). Labels in its order [cvr, ctr, ctcvr]; ESMM's loss is CTR + CTCVR."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402

USER_SIDE = ("101", "121", "122", "124", "125", "126", "127", "128", "129")


class TimedLoader:
  """The DataLoader, cut once the clock's window is full (throughput mode)."""

  def __init__(self, loader, clock):
    self.loader, self.clock = loader, clock

  def __iter__(self):
    for batch in self.loader:
      if self.clock.done:
        return
      yield batch
      self.clock.step()

  def __len__(self):
    return len(self.loader)


def main():
  args = common.parse_args(__doc__)
  import torch
  from torch_rechub.basic.features import SparseFeature
  from torch_rechub.models.multi_task import ESMM
  from torch_rechub.trainers import MTLTrainer
  from torch_rechub.utils.data import DataGenerator
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)
  ids, labels = common.load_split(args.data, "train", args.fields, args.rows)
  test_ids, test_labels = common.load_split(args.data, "test", args.fields, args.rows)
  feats = {f: SparseFeature(f"f{f}", vocab_size=args.rows[f], embed_dim=args.embedding_dim)
           for f in args.fields}
  user = [feats[f] for f in args.fields if f in USER_SIDE]
  item = [feats[f] for f in args.fields if f not in USER_SIDE]
  tower = {"dims": args.hidden}
  model = ESMM(user, item, cvr_params=dict(tower), ctr_params=dict(tower))
  as_x = lambda a: {f"f{f}": a[:, j] for j, f in enumerate(args.fields)}
  as_y = lambda lab: np.stack([lab["conversion"], lab["click"], lab["ctcvr"]], axis=1)
  train_dl, _, test_dl = DataGenerator(as_x(ids), as_y(labels)).generate_dataloader(
      x_val=as_x(test_ids[:1]), y_val=as_y({k: v[:1] for k, v in test_labels.items()}),
      x_test=as_x(test_ids), y_test=as_y(test_labels), batch_size=args.batch_size)
  trainer = MTLTrainer(model, task_types=["classification"] * 3, n_epoch=args.epochs,
                       device="cpu", model_path=args.work_dir)
  clock = common.Clock(args.warmup_steps, args.seconds)
  sys.stdout = open(os.devnull, "w")  # its per-epoch prints and progress bars
  for _ in range(args.epochs if args.seconds <= 0 else 1):
    trainer.train_one_epoch(TimedLoader(train_dl, clock))
  sys.stdout = sys.__stdout__
  predictions = None
  if args.seconds <= 0:
    model.eval()
    out = []
    with torch.no_grad():
      for x, _ in test_dl:
        out.append(model(x).numpy())
    out = np.concatenate(out)
    predictions = {"cvr": out[:, 0], "ctr": out[:, 1], "ctcvr": out[:, 2],
                   "click": test_labels["click"], "conversion": test_labels["conversion"]}
  common.write_result(args, "torch-rechub 0.9.0 ESMM (PyTorch, DataLoader)", clock, predictions)


if __name__ == "__main__":
  main()
