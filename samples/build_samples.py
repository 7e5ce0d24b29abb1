"""Writes samples/prompts.jsonl and samples/multiturn.parquet (run from the repo root).

The pairs were written for nfb (no third-party data, same license as nfb). They mix quality
on purpose: correct and complete, correct but thin, wrong, off-topic, refusing, rambling.
"""

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

PAIRS = [
    ("What is the capital of Australia?", "The capital of Australia is Canberra. It was chosen as a compromise between Sydney and Melbourne and has been the seat of government since 1927.", "good"),
    ("What is the capital of Australia?", "Sydney.", "wrong"),
    ("Convert 100 degrees Fahrenheit to Celsius.", "Subtract 32 and multiply by 5/9: (100 - 32) x 5/9 = 37.8 degrees Celsius.", "good"),
    ("Convert 100 degrees Fahrenheit to Celsius.", "It is about 212 degrees Celsius.", "wrong"),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall\nAmber light on quiet paths\nThe year exhales slow", "good"),
    ("Write a haiku about autumn.", "Autumn is a season that comes after summer and before winter. Many trees lose their leaves.", "off-format"),
    ("How do I reverse a list in Python?", "Use slicing: `my_list[::-1]` returns a reversed copy, and `my_list.reverse()` reverses it in place. `reversed(my_list)` gives an iterator.", "good"),
    ("How do I reverse a list in Python?", "You can use a loop.", "thin"),
    ("Explain photosynthesis to a ten-year-old.", "Plants make their own food. Their leaves catch sunlight, take in water from the roots and carbon dioxide from the air, and turn them into sugar for energy. Oxygen comes out as a leftover, which is the air we breathe.", "good"),
    ("Explain photosynthesis to a ten-year-old.", "Photosynthesis is the process by which photoautotrophs convert electromagnetic radiation into chemical energy via the light-dependent reactions and the Calvin-Benson-Bassham cycle in the stroma of chloroplasts.", "wrong audience"),
    ("Give me three tips for better sleep.", "1. Keep a fixed wake-up time, even on weekends. 2. Avoid screens and caffeine in the hour before bed. 3. Keep the bedroom dark, quiet and cool.", "good"),
    ("Give me three tips for better sleep.", "Sleep is important for health. Everyone should sleep well.", "unhelpful"),
    ("What is 17 x 23?", "17 x 23 = 391.", "good"),
    ("What is 17 x 23?", "17 x 23 = 381.", "wrong"),
    ("Summarize the plot of Romeo and Juliet in two sentences.", "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings leads both to take their own lives, which finally reconciles their families.", "good"),
    ("Summarize the plot of Romeo and Juliet in two sentences.", "It is a play by Shakespeare. It is very famous and has been adapted many times into films, ballets and musicals, and people still read it in school all over the world today.", "misses the task"),
    ("How can I politely decline a meeting invitation?", "You could write: 'Thank you for the invitation. Unfortunately I can't attend at that time. Could you share the notes afterwards, or would another time work?' It thanks them, declines clearly and offers an alternative.", "good"),
    ("How can I politely decline a meeting invitation?", "Just don't show up.", "bad advice"),
    ("What does HTTP status code 404 mean?", "404 Not Found: the server is reachable but has no resource at the requested URL.", "good"),
    ("What does HTTP status code 404 mean?", "It means the server crashed.", "wrong"),
    ("Translate 'Good morning, how are you?' into Spanish.", "Buenos días, ¿cómo estás?", "good"),
    ("Translate 'Good morning, how are you?' into Spanish.", "Bonjour, comment allez-vous ?", "wrong language"),
    ("Is it safe to mix bleach and ammonia for cleaning?", "No. Mixing bleach and ammonia releases toxic chloramine gas, which can cause breathing problems. Use them separately and ventilate the room.", "good"),
    ("Is it safe to mix bleach and ammonia for cleaning?", "Yes, it makes a stronger cleaner.", "dangerous"),
    ("Write a SQL query that counts orders per customer.", "SELECT customer_id, COUNT(*) AS orders FROM orders GROUP BY customer_id ORDER BY orders DESC;", "good"),
    ("Write a SQL query that counts orders per customer.", "SELECT * FROM orders;", "incomplete"),
    ("What causes the seasons on Earth?", "The tilt of Earth's axis, about 23.4 degrees. As Earth orbits the Sun, each hemisphere leans toward it for part of the year and receives more direct sunlight and longer days.", "good"),
    ("What causes the seasons on Earth?", "The Earth is closer to the Sun in summer and farther in winter.", "misconception"),
    ("Suggest a name for a bakery.", "How about 'Rise & Crumb'? It hints at bread rising and is easy to remember.", "good"),
    ("Suggest a name for a bakery.", "I cannot help with that request.", "refusal"),
    ("How many minutes are in a week?", "7 days x 24 hours x 60 minutes = 10,080 minutes.", "good"),
    ("How many minutes are in a week?", "There are 1,440 minutes in a week.", "wrong"),
    ("Explain what a hash table is in one paragraph.", "A hash table stores key-value pairs in an array. A hash function turns each key into an index, so lookups, inserts and deletes take constant time on average; collisions, when two keys map to one slot, are handled by chaining or probing.", "good"),
    ("Explain what a hash table is in one paragraph.", "A hash table is a table. It has hashes in it. Hashes are used in computers. Tables are also used in databases, and databases are used in many companies around the world.", "rambling"),
    ("What should I pack for a day hike?", "Water (at least 2 litres), snacks, a map or offline GPS, sun protection, a rain layer, a small first-aid kit and a charged phone. Tell someone your route.", "good"),
    ("What should I pack for a day hike?", "A tent, a sleeping bag and a camping stove.", "mismatched"),
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are a concise cooking assistant."},
     {"role": "user", "content": "I have eggs, spinach and feta. What can I make?"},
     {"role": "assistant", "content": "A spinach and feta omelette, or a quick frittata."},
     {"role": "user", "content": "How do I make the frittata?"},
     {"role": "assistant", "content": "Whisk 6 eggs, wilt the spinach in an oven-safe pan, pour in the eggs, crumble the feta on top, cook 3 minutes on the stove, then bake at 190 C for 10-12 minutes until set."}],
    [{"role": "user", "content": "What's the difference between a list and a tuple in Python?"},
     {"role": "assistant", "content": "Lists are mutable, tuples are immutable."},
     {"role": "user", "content": "When would I use a tuple then?"},
     {"role": "assistant", "content": "Whenever."}],
    [{"role": "user", "content": "Can you recommend a book on statistics for beginners?"},
     {"role": "assistant", "content": "'The Art of Statistics' by David Spiegelhalter explains the ideas with real examples and little maths."}],
    [{"role": "user", "content": "My code says IndexError: list index out of range."},
     {"role": "assistant", "content": "You are reading an index the list doesn't have. Could you share the line?"},
     {"role": "user", "content": "print(items[len(items)])"},
     {"role": "assistant", "content": "Indexes run from 0 to len(items) - 1, so items[len(items)] is one past the end. Use items[-1] or items[len(items) - 1] for the last element."}],
    [{"role": "user", "content": "Plan a 3-day trip to Rome."},
     {"role": "assistant", "content": "Rome is the capital of Italy."}],
    [{"role": "system", "content": "Answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light reaches our eyes from every direction of the sky."}],
    [{"role": "user", "content": "How do I convert a string to an int in JavaScript?"},
     {"role": "assistant", "content": "Use parseInt('42', 10) or Number('42'); both return 42, and both give NaN for text that is not a number."},
     {"role": "user", "content": "And a float?"},
     {"role": "assistant", "content": "parseInt('3.14') works fine for floats."}],
    [{"role": "user", "content": "Write a limerick about a cat."},
     {"role": "assistant", "content": "A cat with a taste for the cream\nWould plot and would tiptoe and scheme;\nShe'd leap to the shelf,\nHelp herself to herself,\nThen nap in a warm sunny beam."}],
]


def main() -> None:
    here = Path(__file__).parent
    with open(here / "prompts.jsonl", "wb") as fh:
        for i, (p, r, kind) in enumerate(PAIRS):
            fh.write(orjson.dumps({"id": f"p{i:03d}", "prompt": p, "response": r, "kind": kind})
                     + b"\n")
    pq.write_table(pa.table({"conversation_id": [f"c{i:03d}" for i in range(len(CONVERSATIONS))],
                             "messages": CONVERSATIONS,
                             "turns": pa.array([len(c) for c in CONVERSATIONS], pa.int16())}),
                   here / "multiturn.parquet")


if __name__ == "__main__":
    main()
