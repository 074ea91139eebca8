"""Alignment training from the store: SFT, reward model, DPO, KTO, PPO.

    from alignment.training.job import TrainRequest, run_training
    result = run_training(TrainRequest("dpo", model="default", preset="cpu-lora",
                                       overrides=[{"trainer": {"max_steps": 50}}]), engine=engine)

Modules: one per method with its config class beside it (sft.py, reward.py, dpo.py, kto.py on
TRL's trainers; ppo.py, prefloop's own, with ppo_math.py and ppo_reward.py; each exports METHOD); job.py runs one training end to end; runs.py keeps the
TrainingRun row, its metric curves and the lineage; presets/ holds the preset YAML files and reads them;
packing.py builds the prefix-shared padding-free batches of the pairwise trainers; common.py
holds what they share (the non-finite-loss guard, the machine-specific settings).

A new method is a module with a MethodSpec named METHOD and its entry in
methods.METHODS (the one list of methods); the CLI, presets and run lifecycle take it from there.
"""
