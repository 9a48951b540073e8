"""The vocabulary of the built-in corpus: names, animals, places, objects, weather, skills.

Plain data, no logic. Every list is small enough to read, and together they give many
thousands of distinct stories. Words are chosen from the simple vocabulary of children's
books (the TinyStories paper, Eldan & Li 2023, shows a tiny model learns fluent English from
such text).
"""
from __future__ import annotations

GIRL_NAMES = (
    "Lily", "Mia", "Emma", "Sara", "Lucy", "Anna", "Zoe", "Ella", "Amy", "Rosa", "Nora",
    "Maya", "Ruby", "Ivy", "Hana", "Olivia", "Sophie", "Grace", "Chloe", "Isla", "Leah",
    "Ada", "Nina", "Elsa", "Kira", "Aisha", "Mei", "Priya", "Julia", "Tess",
)
BOY_NAMES = (
    "Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Tim", "Noah", "Finn", "Oscar", "Hugo",
    "Luke", "Owen", "Ravi", "Omar", "Jake", "Milo", "Theo", "Eli", "Kai", "Ryan", "Adam",
    "Lucas", "Felix", "Arlo", "Toby", "Ezra", "Hiro", "Diego", "Joe",
)
# Children who go by "they" in the stories.
THEY_NAMES = ("Alex", "Robin", "Charlie", "Jordan", "Riley", "Sky", "Quinn", "Jules", "Rowan", "Kit")
ANIMAL_NAMES = (
    "Pip", "Bubbles", "Whiskers", "Fluffy", "Spot", "Coco", "Daisy", "Buddy", "Sunny",
    "Patch", "Biscuit", "Pepper", "Hoppy", "Nibbles", "Tiny", "Shadow", "Ziggy", "Lulu",
    "Rusty", "Dot", "Ollie", "Puff", "Snowy", "Bean", "Waddles", "Squeak", "Misty", "Bolt",
)

# (kind, plural)
ANIMALS = (
    ("cat", "cats"), ("dog", "dogs"), ("puppy", "puppies"), ("kitten", "kittens"),
    ("bunny", "bunnies"), ("bear", "bears"), ("fox", "foxes"), ("owl", "owls"), ("duck", "ducks"),
    ("mouse", "mice"), ("frog", "frogs"), ("squirrel", "squirrels"), ("turtle", "turtles"),
    ("elephant", "elephants"), ("bird", "birds"), ("lion", "lions"), ("pig", "pigs"),
    ("lamb", "lambs"), ("hedgehog", "hedgehogs"), ("ant", "ants"), ("monkey", "monkeys"),
    ("penguin", "penguins"), ("goat", "goats"), ("horse", "horses"),
)

# Adjectives for a main character; "an" before vowel sounds is fixed by grammar.fix_articles.
CHARACTER_ADJECTIVES = (
    "little", "small", "brave", "curious", "kind", "shy", "happy", "clever", "gentle",
    "playful", "friendly", "cheerful", "busy", "silly", "young", "quiet", "helpful", "lively",
)
HUMAN_KINDS = {"he": ("boy",), "she": ("girl",), "they": ("child", "kid")}

# Grown-ups who help: (what the child calls them, pronoun).
HELPERS = (("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"))

# (name, being there, going there, is_outside, has_trees)
PLACES = (
    ("park", "in the park", "went to the park", True, True),
    ("garden", "in the garden", "went out into the garden", True, True),
    ("forest", "in the forest", "went for a walk in the forest", True, True),
    ("backyard", "in the backyard", "went out to the backyard", True, True),
    ("meadow", "in the meadow", "went to the meadow", True, True),
    ("farm", "on the farm", "went to visit the farm", True, True),
    ("beach", "at the beach", "went to the beach", True, False),
    ("pond", "by the pond", "went down to the pond", True, True),
    ("river", "by the river", "went down to the river", True, True),
    ("hill", "on the hill", "walked up the hill", True, True),
    ("playground", "at the playground", "went to the playground", True, True),
    ("zoo", "at the zoo", "went to the zoo", True, True),
    ("village", "in the village", "walked through the village", True, True),
    ("market", "at the market", "went to the market", True, False),
    ("school", "at school", "went to school", False, False),
    ("library", "at the library", "went to the library", False, False),
    ("kitchen", "in the kitchen", "went into the kitchen", False, False),
    ("house", "at home", "stayed at home", False, False),
)

COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "brown", "black", "gray")

# Things a character can own and lose: (noun, can_blow_away, can_break)
TOYS = (
    ("ball", True, False), ("kite", True, True), ("doll", False, True),
    ("teddy bear", False, False), ("toy car", False, True), ("toy boat", False, True),
    ("drum", False, True), ("hat", True, False), ("balloon", True, False), ("scarf", True, False),
    ("umbrella", True, True), ("toy train", False, True), ("yo-yo", False, True),
    ("spinning top", False, True), ("robot", False, True), ("book", False, False),
    ("paper plane", True, True), ("music box", False, True), ("bucket", False, True),
)

# Things that can be counted (singular, plural) for story sums.
COUNTABLES = (
    ("apple", "apples"), ("cookie", "cookies"), ("flower", "flowers"), ("shell", "shells"),
    ("stone", "stones"), ("sticker", "stickers"), ("balloon", "balloons"), ("egg", "eggs"),
    ("marble", "marbles"), ("crayon", "crayons"), ("leaf", "leaves"), ("acorn", "acorns"),
    ("cupcake", "cupcakes"), ("orange", "oranges"), ("carrot", "carrots"), ("feather", "feathers"),
    ("button", "buttons"), ("strawberry", "strawberries"), ("block", "blocks"), ("star", "stars"),
)

# Snacks that can be broken in two and shared.
FOODS = (
    "cookie", "sandwich", "muffin", "cupcake", "banana", "pancake", "granola bar",
    "cheese sandwich", "chocolate bar", "pretzel", "rice cake", "apple pie",
)

# (weather, sentence describing it); plots may require wind, sun or rain.
WEATHER = {
    "sunny": ("The sun was shining and the sky was blue.",
              "It was a bright and sunny day.",
              "The sun was warm and the birds were singing."),
    "windy": ("The wind was blowing hard that day.",
              "It was a windy day, and the leaves were dancing in the air.",
              "A strong wind was blowing through the trees."),
    "rainy": ("Big grey clouds covered the sky, and soon it began to rain.",
              "It was a rainy day, and drops of water tapped on the windows.",
              "The rain fell softly all morning."),
    "cloudy": ("The sky was grey and cloudy.",
               "Soft white clouds were floating across the sky.",
               "It was a cool and cloudy day."),
}

TIMES = ("One day", "One morning", "One afternoon", "One Saturday", "Early one morning",
         "One spring day", "After lunch one day", "On a Sunday", "One autumn day")

ACTIVITIES = (
    "play with {his} friends", "run in the grass", "sing songs", "draw pictures",
    "look at the clouds", "read books", "climb trees", "play hide and seek",
    "build things with blocks", "dance to music", "splash in puddles", "pick flowers",
    "help {his} family", "tell jokes", "collect pretty stones", "watch the birds",
)

# Where a lost thing turns up, outside and inside.
OUTDOOR_SPOTS = (
    "under a big bush", "behind a tree", "under a pile of leaves", "in the tall grass",
    "under a bench", "beside a flower pot", "next to a big rock", "behind the fence",
)
INDOOR_SPOTS = (
    "under the bed", "behind the couch", "inside an old box", "in a basket",
    "under a blanket", "next to the door", "on a high shelf", "under the table",
)

# A small animal in trouble: (animal, what is wrong).
HURT_ANIMALS = (
    ("bird", "its wing was hurt"), ("puppy", "it had lost its way home"),
    ("kitten", "it was stuck in a bush"), ("duckling", "it could not find its mother"),
    ("rabbit", "its paw was hurt"), ("turtle", "it was lying on its back"),
    ("hedgehog", "it was cold and hungry"), ("baby owl", "it had fallen out of its nest"),
)

SKILLS = (
    # (goal phrase, trying sentence, failure sentence, success sentence)
    ("ride a bike", "{He} got on the bike and pushed the pedals.",
     "The bike wobbled, and {he} fell down on the grass.",
     "At last, the bike rolled straight, and {he} rode all the way to the big tree."),
    ("swim", "{He} jumped into the water and kicked {his} legs.",
     "But {he} swallowed some water and had to grab the side.",
     "At last, {he} swam from one side to the other all by {self}."),
    ("bake a cake", "{He} mixed flour, eggs and sugar in a big bowl.",
     "But the first cake came out flat and burnt.",
     "At last, a round and fluffy cake came out of the oven."),
    ("tie {his} shoes", "{He} made two loops with the laces.",
     "But the loops fell apart again and again.",
     "At last, the bow stayed tight, and {he} walked proudly across the room."),
    ("whistle", "{He} pressed {his} lips together and blew.",
     "But only air came out, with no sound at all.",
     "At last, a clear little whistle came out, and a bird whistled back."),
    ("climb the big hill", "{He} started up the steep path.",
     "Halfway up, {his} legs got tired and {he} slid back down.",
     "At last, {he} stood at the very top and could see the whole village."),
    ("build a tall tower", "{He} put one block on top of another.",
     "But the tower fell over with a loud crash.",
     "At last, the tower stood taller than {he} {was}."),
)
