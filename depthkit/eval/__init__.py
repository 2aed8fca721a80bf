"""depthkit.eval: benchmark evaluation with published zero-shot protocols (see docs/evaluation.md).

- `alignment`: per-image least squares in disparity or depth space, median scaling, none.
- `metrics`: AbsRel, SqRel, RMSE, RMSE log, log10, SILog, delta1/2/3; crops and masks; DA-2K pair accuracy.
- `benchmarks`: the protocol table (`PROTOCOLS`) and readers for NYUv2, KITTI, DIODE, ETH3D, Sintel, DA-2K and
  manifest CSVs.
- `scoring`: one image scored by the protocol (mask, alignment, metrics); the runner's and training validation's.
- `runner`: `evaluate` with saved predictions (`FolderPredictor`) or a model (`ModelPredictor`).
- `report`: printed table, atomic JSON/CSV files, worst-images figure, W&B table.
- `commands`: the `depthkit eval` sub-command.

Nothing here imports lightning or `depthkit.train`; submodules are imported explicitly.
"""
