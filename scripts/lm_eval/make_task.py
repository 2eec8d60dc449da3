"""A small multiple-choice task for lm-eval in OUT/tasks (its data a local JSON-lines file: no hub):
12 seeded questions of 2-6 words, 3 choices each (scripts/lm_eval_check.sh)."""
import json
import os
import random
import sys

WORDS = ["cat", "dog", "the", "sun", "red", "blue", "tree", "sea", "hat", "map"]
TASK = """task: ia3_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main(out: str) -> None:
    rng = random.Random(0)
    phrase = lambda low, high: " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))  # noqa: E731
    data = os.path.join(out, "data.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(12):
            choices = [" " + phrase(1, 3) for _ in range(3)]
            f.write(json.dumps({"question": phrase(2, 6), "choices": choices, "answer": rng.randrange(3)}) + "\n")
    os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
    with open(os.path.join(out, "tasks", "ia3_tiny_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(TASK.format(data=data))


if __name__ == "__main__":
    main(sys.argv[1])
