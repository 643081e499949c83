"""What `opt_main.py` runs, one concern per module.

How the code fits: `opt_main.main` parses the command line once into specs (`specs.read_specs`)
and dispatches to a phase (`phases.run_baseline`, `run_admm`, `run_rew`, `run_retrain`;
`deploy.run_evaluate`, `run_export`). A training phase checks its inputs, locks its run
directory and calls `engine.fit`, which runs `engine.train_one_epoch` and `engine.evaluate` per
epoch; `engine.train_step` is one batch, where the teacher, the regulariser (`admm.ADMM` /
`admm.Reweighted`), the masks (`admm.Masks`) and the optimiser step come in.

- `runtime`: processes (torchrun), devices, seeding, logging, the two error types
- `files`: atomic writes, the run directory's lock, the original's file names, baseline lookup
- `checkpoints`: the checkpoint schema (with a version key), its one builder, --resume checks
- `data`: clip datasets and loaders
- `optim`: optimisers, learning-rate schedules, precision
- `engine`: train_step, train_one_epoch, evaluate, fit
- `specs`: what a run is, read off the command line once
- `phases`, `deploy`: the phases
"""
