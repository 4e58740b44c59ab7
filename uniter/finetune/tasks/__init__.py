"""The fine-tuning tasks, by the name of their config field (`FinetuneConfig.<name>`), in the order of
the report's columns (the paper's Table 2). A task is its module; see `base.py` for what it provides."""

from uniter.finetune.tasks import nlvr2, refcoco, retrieval, vqa
from uniter.finetune.tasks.base import FinetuneTask

FINETUNE_TASKS: dict[str, FinetuneTask] = {
    "vqa": vqa.TASK,
    "retrieval": retrieval.TASK,
    "nlvr2": nlvr2.TASK,
    "refcoco": refcoco.TASK,
}
