"""Alignment training from the store: SFT, reward model, DPO, KTO, PPO.

    from alignment.training.job import TrainRequest, run_training
    result = run_training(TrainRequest("dpo", model="default", preset="cpu-lora",
                                       overrides=[{"trainer": {"max_steps": 50}}]), engine=engine)

Modules: one per method with its config class beside it (sft.py, reward.py, dpo.py, kto.py on
TRL's trainers; ppo.py, prefloop's own, with ppo_math.py and ppo_reward.py; each exports METHOD); plan.py decides a run before it trains (a frozen RunPlan, made by plan_run for new and resumed runs alike); job.py runs a plan end to end; runs.py keeps the
TrainingRun row, its metric curves and the lineage; presets/ holds the preset YAML files and reads them;
packing.py builds the prefix-shared padding-free batches of the pairwise trainers; common.py
holds what they share (the non-finite-loss guard, the machine-specific settings).

Private members of TRL, transformers and PEFT are touched in one place only,
`alignment/_compat/` (`trl.py`: the packed DPO/reward trainers' hooks into TRL; `transformers.py`:
the packed attention and forward, PPO's checkpoints through Trainer's own). Each such fast path
runs only on the library versions it was tested with (`TESTED` there) and unless
`PREFLOOP_COMPAT=public`; otherwise the trainers take a public-API path that is slower, never
different: TRL's padded batches and its own `precompute_ref_log_probs`, prefloop's tokenization
of held-out pairs, PPO checkpoints written and read through public calls. tests/test_compat_trl.py
trains both paths on the same tiny model and checks they agree.

A new method is a module with a MethodSpec named METHOD and its entry in
methods.METHODS (the one list of methods); the CLI, presets and run lifecycle take it from there.
"""
