"""Fine-tuning and evaluation: the finetune and evaluate stages, their config and the report; each
downstream task (files, metric, examples, predictions) is one module of `tasks/`."""
