"""Recovery: training the 16-bit salient columns of a quantized model back to the original's behaviour.

Laid out like a peft tuner, reading top to bottom:
    config.py     RecoverConfig, TrainConfig: every setting, validated once
    model.py      the model-level driver: wrap salient layers, LoRA and full baselines, finish, merge
    layer.py      RecoveryLayer (one salient layer's training state) and SalientLinear
    objective.py  distillation (KL to the teacher), cross-entropy, or a mix
    teacher.py    the teacher's logits, live or cached, and the text it writes
    noise.py      GIFT-SW's quantization noise and the frozen matmul that carries it
    data.py       training examples: packed text, instruction and chat data, mixtures
    trainer.py    the training loop, with exact resume
The API (qrecover.api.recover) runs them in that order and saves the result.
"""
