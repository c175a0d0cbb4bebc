"""`wflw bench loader | train-step | epoch | start | precision`: a table on stdout, JSON in data/bench.

- `loader` (loader.py): augmented, normalised network inputs per second from our data path (decoded
  crops held in memory on the training device, one batched affine warp per batch:
  `engine.inputs_and_targets`) against a loader in the reference's (MMPose's) style: a torch Dataset
  that decodes the ORIGINAL image file with Pillow, crops and warps one face with a PIL affine (same
  flip/scale/rotation/shift ranges, drawn per sample), normalises it, in DataLoader workers (one per
  core). Same faces, same batch size, both in one run; the images are synthetic WFLW at WFLW-like sizes,
  generated and converted here.
- `train-step` (step.py): `engine.train_step`, the step `engine.train_one_epoch` runs (forward, loss,
  backward, Adam, LR schedule), on random inputs already on the device, with and without
  `torch.compile`, or named variants of it (Inductor options, the whole step as a CUDA graph) at several
  batch sizes, timed in turns; peak memory; FLOPs (FlopCounterMode) and model FLOP utilisation.
- `epoch` (epoch.py): `engine.train_one_epoch` over an in-memory face set (data + step, end to end) and
  the time the params' schedule (train.epochs of data.synthetic.train_faces) would take at that speed.
- `start` (start.py): the same short job cold, then warm, in fresh processes sharing one compile cache:
  the phases from launch to the first full-speed step.
- `precision` (precision.py): one trained model's NME in fp32 and in bf16 autocast (the fp32 head).

Each reads a params file (configs/deeppose_res50_wingloss_wflw.yaml unless --params names another, with
--set) for what params define, and builds model, optimizer, schedule, compile and epoch batches with
core/ as `wflw train` does. common.py holds what they share (machine info, the training setup, tables,
JSON); cli.py the `wflw bench` parser (measurement options only) and the dispatch to the run functions.

Benchmarks only measure; they never assert a speed. Torch stack only (no dvc, mlflow, prefect, requests).
This file imports nothing; `wflw bench` loads it and cli.py, and a mode's module only when it runs.
"""
