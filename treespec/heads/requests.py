"""Requests the target answers to make a head's chat data (heads/features.py, `data.answers`).

A head drafts well where its training text looks like what the target writes when it is used.
A chat model answering users writes prose, lists, explanations, small calculations and code,
in its chat template; files on disk are mostly code. Nothing can be downloaded, so the
requests are written here, offline, from two sources:

- `code_requests`: the standard library's documented functions ("write a function that
  <docstring>", "explain this code"), on any machine with Python;
- `prose_requests`: templates over fixed lists of everyday subjects, writing forms, roles,
  concept pairs and word problems with drawn numbers, in the spirit of the general chat
  prompt sets speculative-decoding heads are trained on (EAGLE regenerates ShareGPT's answers
  with the target; docs/heads.md).

`chat_requests` mixes them half and half. None of them is a prompt of the sets the goals are
measured on (HumanEval, MT-Bench): those are never read here.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

SUBJECTS = (
    "learning a second language as an adult", "working from home", "a week-long trip to Japan", "healthy sleep habits",
    "how vaccines work", "the history of the printing press", "saving money on a small income", "starting a vegetable garden",
    "the water cycle", "renewable energy", "adopting a rescue dog", "preparing for a job interview", "time management for students",
    "the causes of the French Revolution", "how a bill becomes law", "volcanoes", "the benefits of reading fiction",
    "moving to a new city", "a local farmers' market", "the first moon landing", "photosynthesis", "public transport in cities",
    "a friendship that ended", "climbing a mountain", "running a small bakery", "electric cars", "the ethics of AI",
    "a rainy afternoon", "the Roman Empire", "how the stock market works", "composting", "learning to play the piano",
    "the importance of bees", "a museum visit", "team sports for children", "social media and teenagers", "black holes",
    "cooking for one person", "a historic lighthouse", "recycling plastics", "the invention of the telephone", "meditation",
    "planning a wedding on a budget", "ocean tides", "a new coffee shop", "the Silk Road", "machine translation", "insomnia",
)
FORMS = (
    "a short blog post about", "an email to a colleague about", "a persuasive paragraph about", "a short story about",
    "a product description related to", "a list of practical tips on", "a dialogue between two friends about",
    "a summary for a ten-year-old of", "a short poem about", "a formal letter to a city council about",
    "an outline for a five-minute talk on", "a balanced pros-and-cons comparison on",
)
ROLES = (
    ("a tour guide in Rome", "welcome a group and describe the first stop"),
    ("a personal trainer", "plan a first week of exercise for a beginner"),
    ("a detective in 1920s London", "explain how you solved your latest case"),
    ("a chef", "teach me to make a simple tomato soup"),
    ("a career counsellor", "help me choose between two job offers"),
    ("a librarian", "recommend three books for a long flight and say why"),
    ("a ship's captain", "brief the crew before a storm"),
    ("a math teacher", "explain fractions to a struggling student"),
    ("a museum curator", "introduce an exhibition about ancient Egypt"),
    ("a customer-support agent", "help a customer whose order arrived damaged"),
)
CONCEPTS = (
    ("weather", "climate"), ("a virus", "a bacterium"), ("stocks", "bonds"), ("speed", "velocity"),
    ("a simile", "a metaphor"), ("mitosis", "meiosis"), ("inflation", "deflation"), ("an atom", "a molecule"),
    ("a democracy", "a republic"), ("empathy", "sympathy"), ("RAM", "storage"), ("a comet", "an asteroid"),
    ("correlation", "causation"), ("a lake", "a sea"), ("nuclear fission", "nuclear fusion"),
)
PROBLEMS = (
    "A train travels {a} km in {b} hours. At the same speed, how far does it go in {c} hours? Explain each step.",
    "A shop sells pens at {a} cents each and notebooks at {b} cents each. How much do {c} pens and {b} notebooks cost?",
    "Alice is {a} years old. Her brother is {b} years younger and her mother is {c} times her brother's age. "
    "How old is the mother? Show your reasoning.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter? If its length grows by {c} cm, "
    "by how much does the area grow?",
    "{a} workers build a wall in {b} days. How long would {c} workers take, working at the same rate? Explain.",
    "If you save {a} dollars a week, how many weeks do you need to buy a bike that costs {b} dollars, after a "
    "discount of {c} percent?",
    "Solve for x: {a}x + {b} = {c}. Then check your answer.",
    "A bag has {a} red, {b} blue and {c} green marbles. What is the probability of drawing a blue one? "
    "And two blue ones in a row without replacement?",
)


def prose_requests(count: int, seed: int) -> list[str]:
    """`count` general chat requests, in turn: writing, role play, concepts, word problems."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(f"Write {rng.choice(FORMS)} {rng.choice(SUBJECTS)}.")
        elif kind == 1:
            role, task = rng.choice(ROLES)
            out.append(f"Pretend you are {role}. {task[0].upper()}{task[1:]}.")
        elif kind == 2:
            x, y = rng.choice(CONCEPTS)
            out.append(f"What is the difference between {x} and {y}? Give an example of each.")
        else:
            a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
            out.append(rng.choice(PROBLEMS).format(a=a, b=b, c=c))
    return out


def code_requests(count: int, seed: int, files: list[Path]) -> list[str]:
    """`count` user requests written from the documented functions in `files` (the standard
    library's .py files): every other one asks for a function from its signature and
    docstring, the rest to explain a function's code in prose."""
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    out: list[str] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8", errors="ignore")
            tree = ast.parse(source)
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            if len(doc) < 40:
                continue
            if len(out) % 2 == 0:
                args = ", ".join(a.arg for a in node.args.args)
                out.append(f"Write a Python function `{node.name}({args})`: {doc.split(chr(10) * 2)[0]}")
            else:
                code = ast.get_source_segment(source, node) or ""
                if not 80 < len(code) < 3000:
                    continue
                out.append(f"Explain what this Python function does, step by step:\n\n```python\n{code}\n```")
            if len(out) >= count:
                return out
    return out


def chat_requests(count: int, seed: int, files: list[Path]) -> list[str]:
    """`count` requests, half `code_requests` (from `files`) and half `prose_requests`, interleaved."""
    code = code_requests(count - count // 2, seed, files)
    prose = prose_requests(count // 2, seed)
    out = []
    for i in range(max(len(code), len(prose))):
        out += code[i : i + 1] + prose[i : i + 1]
    return out
