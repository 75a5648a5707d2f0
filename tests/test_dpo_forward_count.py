"""Each response is forwarded once per step (one packed row per group) and, with the reference cache
present, DPO training runs no reference forward pass and loads no second model."""

from mmrlhf_lite.dpo import trainer as dpo_trainer
from mmrlhf_lite.models.wrappers import unwrap
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline


def test_forward_calls_per_step(tmp_path, monkeypatch):
    recipe = load_recipe(None, [
        "model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu",
        "data.demo.groups=8", "data.demo.image_size=56", "data.eval_fraction=0", "data.demo.safety_fraction=0",
        f"run.dir={tmp_path / 'run'}", "dpo.train.groups_per_step=2", "dpo.train.grad_accum=1",
        "dpo.train.max_steps=3", "dpo.margin_source=none", "dpo.w=0"])
    run_pipeline(recipe, ["reference"], echo=False)

    loads, calls = [], []
    real_load = dpo_trainer.load_model

    def counting_load(*args, **kwargs):
        model, processor = real_load(*args, **kwargs)
        loads.append(kwargs)

        lora_layer = next(m for m in model.modules() if hasattr(m, "lora_A"))

        def hook(module, args, kwargs):
            ids = kwargs["input_ids"]
            mask = kwargs["attention_mask"]
            calls.append({"rows": ids.shape[0], "adapter_on": not lora_layer.disable_adapters,
                          "mask_dims": mask.dim(), "tokens": int((ids != 0).sum())})
        unwrap(model).model.register_forward_pre_hook(hook, with_kwargs=True)
        return model, processor

    monkeypatch.setattr(dpo_trainer, "load_model", counting_load)
    run_pipeline(recipe, ["dpo"], echo=False)
    assert len(loads) == 1                          # the policy only: no reference model
    assert len(calls) == 3                          # one forward per step (3 steps x 1 micro-batch)
    assert all(c["rows"] == 2 and c["mask_dims"] == 4 and c["adapter_on"] for c in calls), calls
    assert sum(c["rows"] for c in calls) == 6      # 3 steps x 2 groups, each group one packed row
