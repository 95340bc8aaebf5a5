"""Built-in tasks: name -> (module, class, default options)."""

BUILTIN_TASKS: dict[str, tuple[str, str, dict]] = {
    "digits": ("gradindex.tasks.digits", "DigitsTask", {"arch": "mlp"}),
    "digits-mlp": ("gradindex.tasks.digits", "DigitsTask", {"arch": "mlp"}),
    "digits-cnn": ("gradindex.tasks.digits", "DigitsTask", {"arch": "cnn"}),
    "lm": ("gradindex.tasks.lm", "LMTask", {}),
    "lm-deep": ("gradindex.tasks.lm_deep", "DeepLMTask", {}),
    "diffusion": ("gradindex.tasks.diffusion", "DiffusionTask", {}),
    "diffusion-text": ("gradindex.tasks.diffusion_text", "DiffusionTextTask", {}),
    "diffusion-text-lora": ("gradindex.tasks.diffusion_text", "DiffusionTextTask", {"lora_rank": 4}),
    "diffusion-text-sparse": ("gradindex.tasks.diffusion_text", "DiffusionTextTask",
                              {"caption_style": 0.3, "caption_background": 0.2}),
    "diffusion-text-sparse-lora": ("gradindex.tasks.diffusion_text", "DiffusionTextTask",
                                   {"caption_style": 0.3, "caption_background": 0.2, "lora_rank": 4}),
    "resnet": ("gradindex.tasks.resnet", "ResNetTask", {}),
    "tabular-cancer": ("gradindex.tasks.tabular", "TabularTask", {"dataset": "cancer"}),
    "tabular-wine": ("gradindex.tasks.tabular", "TabularTask", {"dataset": "wine"}),
    "tabular-diabetes": ("gradindex.tasks.tabular", "TabularTask", {"dataset": "diabetes"}),
}
