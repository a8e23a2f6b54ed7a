#!/usr/bin/env python3
"""Turn a CSV of question/answer pairs into <SFT>-separated training text (the published guides'
workflow for llama.cpp's finetune):

    python examples/csv_to_sft.py examples/sft/faq.csv > examples/sft/train.txt
    finetune --model-base model.gguf --train-data examples/sft/train.txt --sample-start '<SFT>' ...

Each record becomes "<SFT>Question: ...\\nAnswer: ...\\n".
"""

import csv
import sys


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: csv_to_sft.py FILE.csv > train.txt")
    with open(sys.argv[1], newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            q, a = row["question"].strip(), row["answer"].strip()
            sys.stdout.write(f"<SFT>Question: {q}\nAnswer: {a}\n")


if __name__ == "__main__":
    main()
