"""Writes chat_calibration.jsonl, the builtin imatrix calibration conversations (see SOURCE.md). Run from this folder:
``python generate.py``; the output is deterministic (a fixed seed) and committed, so releaser never runs this.

Three kinds of conversations, interleaved by a seeded shuffle:
- hand-written ones (HAND, below): explanations, code, advice, editing, structured output, all written for releaser;
- generated exercises: arithmetic and unit word problems with worked answers, small Python functions on request,
  sorting and table formatting (templates and answers computed here);
- reading tasks on public-domain text: a passage of the King James Bible from releaser/awq/data/kjv_calibration.txt
  (never the quality stage's evaluation text, which is Darwin) continued by the assistant.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
KJV = HERE.parent.parent / "awq" / "data" / "kjv_calibration.txt"
OUT = HERE / "chat_calibration.jsonl"
SYSTEM = "You are a helpful, precise assistant. Answer clearly and show your reasoning when it helps."

HAND = [
    [("user", "What is the difference between a process and a thread?"),
     ("assistant", "A process is a running program with its own address space: its memory, open files and other "
      "resources belong to it alone, and the operating system isolates it from other processes. A thread is a path "
      "of execution inside a process. All threads of one process share its memory and files, but each has its own "
      "stack and registers.\n\nIn practice:\n- Creating a thread is cheaper than creating a process.\n- Threads can "
      "communicate through shared memory, which is fast but needs locks to avoid races.\n- A crash in one thread "
      "usually takes down the whole process, while separate processes fail independently.\n\nUse processes for "
      "isolation and for CPU-bound work in languages with a global interpreter lock; use threads for concurrent "
      "work that shares a lot of state.")],
    [("system", "You are a patient maths tutor."),
     ("user", "Why is the derivative of x squared equal to 2x?"),
     ("assistant", "Take the definition of the derivative: the limit, as h goes to zero, of (f(x + h) - f(x)) / h.\n"
      "\nFor f(x) = x^2:\n(x + h)^2 - x^2 = x^2 + 2xh + h^2 - x^2 = 2xh + h^2.\n\nDivide by h: 2x + h.\n\nAs h "
      "shrinks to zero, 2x + h approaches 2x. So the slope of the curve y = x^2 at any point x is 2x: at x = 3 the "
      "curve rises 6 units for each unit you move right, at x = 0 it is flat."),
     ("user", "And x cubed?"),
     ("assistant", "The same steps: (x + h)^3 - x^3 = 3x^2 h + 3x h^2 + h^3. Dividing by h gives 3x^2 + 3xh + h^2, "
      "which tends to 3x^2 as h goes to zero. The pattern generalises: the derivative of x^n is n x^(n-1).")],
    [("user", "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces."),
     ("assistant", "```python\ndef is_palindrome(text: str) -> bool:\n    \"\"\"True when text reads the same "
      "forwards and backwards, ignoring case and spaces.\"\"\"\n    cleaned = \"\".join(ch.lower() for ch in text if "
      "not ch.isspace())\n    return cleaned == cleaned[::-1]\n\n\nassert is_palindrome(\"Never odd or even\")\n"
      "assert not is_palindrome(\"palindrome\")\n```\n\nThe function builds a lower-case copy without whitespace and "
      "compares it with its reverse. It runs in linear time. If punctuation should be ignored too, keep only "
      "characters for which `ch.isalnum()` is true.")],
    [("user", "Can you make this sentence clearer? \"Due to the fact that the meeting that was scheduled for "
      "Tuesday was moved, we are needing to reschedule the review that depends on it.\""),
     ("assistant", "\"Because Tuesday's meeting moved, we need to reschedule the review that depends on it.\"\n\n"
      "Changes: \"due to the fact that\" became \"because\", \"the meeting that was scheduled for Tuesday\" became "
      "\"Tuesday's meeting\", and \"we are needing\" became \"we need\".")],
    [("user", "Give me three ideas for a short weekend trip if I like hiking and old towns."),
     ("assistant", "1. A hill region with a walled medieval town at its centre: hike a ridge loop on Saturday and "
      "spend Sunday in the old streets and the market.\n2. A river valley with vineyards: follow the riverside path "
      "between two villages and take the train back, then visit a castle on the second day.\n3. A coastal path "
      "with a fishing harbour: walk the cliffs in the morning, explore the harbour town in the afternoon.\n\nTo "
      "choose, check the travel time first: for two days, keep the journey under three hours each way.")],
    [("user", "Return a JSON object describing a book with fields title, author, year and tags. Use a made-up book."),
     ("assistant", "```json\n{\n  \"title\": \"The Lighthouse Ledger\",\n  \"author\": \"Mara Ellison\",\n  "
      "\"year\": 2019,\n  \"tags\": [\"mystery\", \"coastal\", \"historical\"]\n}\n```")],
    [("user", "Explain what a hash table is to a beginner."),
     ("assistant", "Imagine a wall of numbered mailboxes. To store a letter for \"Alice\", you run her name through "
      "a formula (the hash function) that always turns \"Alice\" into the same mailbox number, say 42, and you put "
      "the letter there. To find it later you compute 42 again and look in one box instead of searching them all."
      "\n\nSometimes two names map to the same box; that is a collision. Hash tables handle it by keeping a short "
      "list in each box or by trying the next free box.\n\nBecause of this, looking up, adding and removing items "
      "takes about the same short time no matter how many items there are. Python's dict and set are hash tables.")],
    [("user", "My sourdough bread comes out dense. What could be wrong?"),
     ("assistant", "The usual causes, in order of likelihood:\n\n- **Weak starter.** It should double within 4 to 8 "
      "hours after feeding. Use it at its peak.\n- **Under-proofing.** The dough should grow by about half and feel "
      "airy. Cold kitchens slow fermentation a lot.\n- **Too little gluten development.** Add a few sets of stretch "
      "and folds during the first two hours.\n- **Too much flour.** Wetter doughs give a more open crumb.\n\nChange "
      "one thing at a time so you can tell which one helped.")],
    [("user", "What does this shell command do? find . -name '*.log' -mtime +7 -delete"),
     ("assistant", "It searches the current directory and everything below it for files whose names end in .log and "
      "that were last modified more than 7 days ago, and deletes them.\n\n- `find .` starts at the current "
      "directory.\n- `-name '*.log'` matches the file names (quoted so the shell does not expand the pattern).\n- "
      "`-mtime +7` keeps files modified more than 7 full days ago.\n- `-delete` removes each match.\n\nRun it first "
      "without `-delete` to see the list of files it would remove.")],
    [("user", "Summarise the causes of inflation in a few sentences."),
     ("assistant", "Inflation is a general rise in prices. It happens when demand grows faster than the economy can "
      "produce (demand-pull), when costs such as energy or wages rise and firms pass them on (cost-push), or when "
      "people expect prices to rise and set wages and prices accordingly. Growth in the money supply beyond the "
      "growth of output feeds all three. Central banks usually respond by raising interest rates, which slows "
      "borrowing and spending.")],
    [("user", "Translate into French: \"The library opens at nine and closes at six on weekdays.\""),
     ("assistant", "« La bibliothèque ouvre à neuf heures et ferme à dix-huit heures en semaine. »")],
    [("user", "Write a SQL query that returns the five customers with the highest total order value. Tables: "
      "customers(id, name), orders(id, customer_id, amount)."),
     ("assistant", "```sql\nSELECT c.id, c.name, SUM(o.amount) AS total\nFROM customers AS c\nJOIN orders AS o ON "
      "o.customer_id = c.id\nGROUP BY c.id, c.name\nORDER BY total DESC\nLIMIT 5;\n```\n\nThe join pairs each order "
      "with its customer, GROUP BY adds up the amounts per customer, and ORDER BY with LIMIT keeps the top five. "
      "Customers without orders do not appear; use a LEFT JOIN and COALESCE(SUM(o.amount), 0) to include them.")],
    [("system", "Answer in one short paragraph."),
     ("user", "Why is the sky blue?"),
     ("assistant", "Sunlight contains all colours. Air molecules scatter short wavelengths much more strongly than "
      "long ones (Rayleigh scattering, which grows with the inverse fourth power of the wavelength), so blue light "
      "is redirected across the whole sky and reaches your eyes from every direction. At sunset the light crosses "
      "more air, most of the blue is scattered away before it arrives, and the sun and clouds look red and orange.")],
    [("user", "I have a list of numbers in Python and want the running average. How?"),
     ("assistant", "```python\nfrom itertools import accumulate\n\nvalues = [4, 8, 15, 16, 23, 42]\nrunning = "
      "[total / n for n, total in enumerate(accumulate(values), start=1)]\nprint(running)\n# [4.0, 6.0, 9.0, 10.75, "
      "13.2, 18.0]\n```\n\n`accumulate` yields the running sums 4, 12, 27, 43, 66, 108, and dividing each by its "
      "position gives the average so far. With NumPy: `np.cumsum(a) / np.arange(1, len(a) + 1)`.")],
    [("user", "What should I check before signing a lease for an apartment?"),
     ("assistant", "- The total monthly cost: rent, service charges, heating, and what the deposit is.\n- The length "
      "of the lease and the notice period for leaving early.\n- Who pays for repairs, and how to report them.\n- "
      "The condition of the flat: photograph every mark and get it written into the inventory.\n- Rules on pets, "
      "subletting and decorating.\n- How and when the deposit is returned.\n\nAsk for any verbal promise to be "
      "added to the contract in writing.")],
    [("user", "Write a haiku about a train at night."),
     ("assistant", "Lit windows rushing\nthrough the fields of sleeping wheat,\none long yellow thread.")],
    [("user", "Is it true that we only use ten percent of our brains?"),
     ("assistant", "No. Brain imaging shows activity across virtually all regions over the course of a day, and "
      "damage to almost any area causes some loss of function. Different tasks engage different networks, so not "
      "every neuron fires at once, but there is no large unused reserve. The brain is also expensive to run, about "
      "a fifth of the body's energy at rest, which evolution would not sustain for idle tissue.")],
    [("user", "How do I undo my last git commit but keep the changes?"),
     ("assistant", "Run:\n\n```bash\ngit reset --soft HEAD~1\n```\n\nThis moves the branch back one commit and "
      "leaves your changes staged. Use `git reset HEAD~1` (mixed) to keep them unstaged instead. If you have "
      "already pushed the commit, prefer `git revert HEAD`, which adds a new commit undoing it without rewriting "
      "shared history.")],
]

FUNCTIONS = [
    ("returns the largest of three numbers", "def largest(a, b, c):\n    return max(a, b, c)"),
    ("counts the vowels in a string", "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in "
     "\"aeiou\")"),
    ("reverses the order of words in a sentence", "def reverse_words(sentence):\n    return \" \".join(reversed("
     "sentence.split()))"),
    ("returns the factorial of n", "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        "
     "result *= k\n    return result"),
    ("checks whether a number is prime", "def is_prime(n):\n    if n < 2:\n        return False\n    k = 2\n    "
     "while k * k <= n:\n        if n % k == 0:\n            return False\n        k += 1\n    return True"),
    ("returns the n-th Fibonacci number", "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, "
     "b = b, a + b\n    return a"),
    ("removes duplicates from a list while keeping the order", "def unique(items):\n    seen = set()\n    out = []"
     "\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n            "
     "out.append(item)\n    return out"),
    ("flattens a list of lists", "def flatten(lists):\n    return [x for sub in lists for x in sub]"),
    ("converts Celsius to Fahrenheit", "def to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32"),
    ("counts how often each word appears in a text", "from collections import Counter\n\n\ndef word_counts(text):"
     "\n    return Counter(text.lower().split())"),
    ("returns the greatest common divisor of two integers", "def gcd(a, b):\n    while b:\n        a, b = b, a % b"
     "\n    return abs(a)"),
    ("splits a list into chunks of size n", "def chunks(items, n):\n    return [items[i:i + n] for i in range(0, "
     "len(items), n)]"),
    ("checks whether two strings are anagrams", "def is_anagram(a, b):\n    return sorted(a.replace(\" \", \"\")."
     "lower()) == sorted(b.replace(\" \", \"\").lower())"),
    ("returns the median of a list of numbers", "def median(values):\n    s = sorted(values)\n    mid = len(s) // "
     "2\n    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2"),
    ("reads a text file and returns its lines without trailing newlines", "def read_lines(path):\n    with "
     "open(path, encoding=\"utf-8\") as fh:\n        return [line.rstrip(\"\\n\") for line in fh]"),
    ("merges two sorted lists into one sorted list", "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while "
     "i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n    "
     "    else:\n            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]"),
]
ASKS = ["Write a Python function that {}.", "Can you show me a Python function that {}?", "I need a small Python "
        "function that {}. Keep it simple.", "In Python, how would I write a function that {}?"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Luca"]
ITEMS = [("apples", 0.4), ("notebooks", 2.5), ("pencils", 0.3), ("tickets", 12.0), ("coffees", 3.2),
         ("plants", 7.5), ("books", 9.0), ("candles", 4.0)]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tunis", "Quebec", "Tbilisi", "Perth", "Dakar"]


def money(x: float) -> str:
    return f"{x:.2f}"


def shopping(rng: random.Random):
    who, (item, price) = rng.choice(NAMES), rng.choice(ITEMS)
    n, paid = rng.randint(2, 12), rng.choice([20, 50, 100])
    total = round(n * price, 2)
    while total > paid:
        n -= 1
        total = round(n * price, 2)
    q = f"{who} buys {n} {item} at {money(price)} each and pays with a {paid} note. How much change is there?"
    a = (f"The {item} cost {n} x {money(price)} = {money(total)}.\nThe change is {paid} - {money(total)} = "
         f"{money(paid - total)}.\n\n{who} gets {money(paid - total)} back.")
    return [("user", q), ("assistant", a)]


def travel(rng: random.Random):
    a, b = rng.sample(CITIES, 2)
    km, speed = rng.randint(120, 900), rng.choice([60, 75, 80, 90, 100, 120])
    hours = km / speed
    h, m = int(hours), round((hours - int(hours)) * 60)
    if m == 60:
        h, m = h + 1, 0
    q = f"A train travels {km} km from {a} to {b} at an average speed of {speed} km/h. How long does the trip take?"
    ans = (f"Time = distance / speed = {km} / {speed} = {hours:.3f} hours.\n{hours:.3f} hours is {h} hours and "
           f"{m} minutes ({hours - h:.3f} x 60 = {m} minutes).\n\nThe trip takes about {h} h {m:02d} min.")
    return [("user", q), ("assistant", ans)]


def percent(rng: random.Random):
    price, off = rng.choice([40, 64, 80, 125, 199, 250, 320]), rng.choice([10, 15, 20, 25, 30, 40])
    cut = price * off / 100
    q = f"A jacket costs {price} and is discounted by {off}%. What is the new price?"
    a = f"{off}% of {price} is {price} x {off} / 100 = {cut:g}.\nNew price: {price} - {cut:g} = {price - cut:g}."
    return [("user", q), ("assistant", a)]


def convert(rng: random.Random):
    kind = rng.choice(["miles", "pounds", "feet", "litres"])
    v = rng.randint(3, 250)
    if kind == "miles":
        q, a = f"How many kilometres are {v} miles?", f"1 mile = 1.609344 km, so {v} miles = {v * 1.609344:.2f} km."
    elif kind == "pounds":
        q, a = f"Convert {v} pounds to kilograms.", f"1 lb = 0.45359237 kg, so {v} lb = {v * 0.45359237:.2f} kg."
    elif kind == "feet":
        q, a = f"What is {v} feet in metres?", f"1 ft = 0.3048 m, so {v} ft = {v * 0.3048:.2f} m."
    else:
        q, a = (f"How many US gallons are {v} litres?",
                f"1 US gallon = 3.785411784 litres, so {v} L = {v / 3.785411784:.2f} gallons.")
    return [("user", q), ("assistant", a)]


def code(rng: random.Random):
    what, body = rng.choice(FUNCTIONS)
    q = rng.choice(ASKS).format(what)
    a = f"```python\n{body}\n```\n\nThis function {what}. Call it with your own values to check the result."
    return [("user", q), ("assistant", a)]


def sort_table(rng: random.Random):
    people = rng.sample(NAMES, 4)
    ages = [rng.randint(18, 80) for _ in people]
    rows = "\n".join(f"{p}: {a}" for p, a in zip(people, ages))
    order = sorted(zip(people, ages), key=lambda t: (t[1], t[0]))
    table = "| Name | Age |\n|---|---|\n" + "\n".join(f"| {p} | {a} |" for p, a in order)
    q = f"Sort these people by age, youngest first, and give a Markdown table:\n{rows}"
    return [("user", q), ("assistant", table)]


def reading(passage: str, rng: random.Random):
    words = passage.split()
    cut = max(20, len(words) // 3)
    start, rest = " ".join(words[:cut]), " ".join(words[cut:])
    ask = rng.choice(["Continue this passage from the King James Bible:\n\n{}",
                      "Here is the beginning of a passage. Please continue it in the same style.\n\n{}",
                      "What comes next? {}"])
    return [("user", ask.format(start)), ("assistant", rest)]


def main(n_generated: int = 150, n_reading: int = 140) -> None:
    rng = random.Random(2026)
    makers = [shopping, travel, percent, convert, code, sort_table]
    convs = [list(c) for c in HAND]
    convs += [rng.choice(makers)(rng) for _ in range(n_generated)]
    passages = [p.strip() for p in KJV.read_text(encoding="utf-8").split("\n\n") if len(p.split()) >= 60]
    convs += [reading(p, rng) for p in rng.sample(passages, n_reading)]
    rng.shuffle(convs)
    for c in convs:
        if c[0][0] != "system" and rng.random() < 0.25:
            c.insert(0, ("system", SYSTEM))
    with open(OUT, "w", encoding="utf-8") as fh:
        for c in convs:
            fh.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in c]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
