"""Plot templates of the built-in stories, part 2: honesty, rain, friendship, practice, kindness.

Same `Plot` shape and slots as `plots.py` (see its docstring for the slot names).
"""
from __future__ import annotations

from data_pipeline.builtin.plots import Plot

BROKEN_TOY = Plot(
    name="broken_toy",
    problem=(
        '{Friend_first} came over to play. {Friend} picked up {hero}\'s {obj} and swung it '
        'around. Oh no! The {obj_noun} fell on the floor and broke into pieces.',
        '{Hero} let {friend_first} play with {his} new {obj}. But {friend} dropped it by '
        'accident, and a piece of the {obj_noun} cracked off.',
    ),
    attempt=(
        '{Hero} looked at the broken {obj_noun} and felt {bad}. {Friend} was scared. '
        '{F_he} wanted to hide and say nothing.',
        '{Hero} was so {bad} that {he} shouted, "You broke it!" {Friend} looked at the floor. '
        '{F_he} did not know what to say.',
    ),
    help=(
        'Then {friend} took a deep breath. "I am sorry, {hero}," {f_he} said. "It was my '
        'fault. I was not careful." {Hero} saw that {friend} was telling the truth.',
        '{Friend} walked up to {hero}. "I broke your {obj_noun}, and I am very sorry," {f_he} '
        'said. "Can I help fix it?" {Hero} felt a little better.',
    ),
    resolution=(
        'They took the pieces to {hero}\'s {helper_rel}. {Helper} found some glue, and together '
        'they fixed the {obj}. It was almost as good as new.',
        '{Hero}\'s {helper_rel} helped them glue the {obj_noun} back together. {Hero} hugged '
        '{friend}. "It is okay," {he} said. "Thank you for telling the truth."',
    ),
    moral=(
        '{Hero} and {friend} learned that saying sorry and telling the truth makes things right.',
        '{Hero} learned that a friend is more important than a toy.',
        'From that day on, they were even better friends than before.',
    ),
    summary='{Friend} broke {hero}\'s {obj} by accident, said sorry, and they fixed it together.',
    titles=('The Broken {Obj_title}', '{Friend} Says Sorry', 'Fixing the {Obj_title}'),
    bad_feelings=("sad", "angry", "upset"),
    reason="because {his} {obj} was broken",
    good_feelings=("happy", "glad", "calm"),
    questions=(
        ("Who broke the {obj_noun}?", "{Friend} broke it by accident."),
        ("How did they fix the {obj_noun}?", "They fixed it with glue."),
        ("What did {friend} say to {hero}?", "{Friend} said sorry."),
    ),
    places=("house",),
    toy="break",
)

RAINY_DAY = Plot(
    name="rainy_day",
    problem=(
        '{Hero} wanted to have a picnic with {friend_first}. {He} packed a basket with a '
        '{food} and some juice. But when {he} looked out of the window, it was raining.',
        '{Hero} and {friend_first} had planned to play outside all day. But dark clouds came, '
        'and rain began to fall. Drip, drop, drip, drop.',
    ),
    attempt=(
        '{Hero} pressed {his} nose on the window and watched the rain. {He} felt {bad}. '
        '"Now our day is ruined," {he} said.',
        '"Go away, rain!" said {hero}, but the rain kept falling. {He} sat on the floor and '
        'felt {bad}.',
    ),
    help=(
        '{His} {helper_rel} smiled. "Why not have a picnic inside?" said {helper}. "You can '
        'put a blanket on the floor and pretend it is a sunny field."',
        '{Friend} had an idea. "Let\'s put on our boots and jump in the puddles!" {f_he} said. '
        '{Helper} found two raincoats for them.',
    ),
    resolution=(
        'So they spread a big blanket on the floor and ate their picnic under a tent of chairs. '
        'They told stories and listened to the rain. It was the best picnic ever.',
        'They ran outside and jumped in every puddle they could find. SPLASH! Water flew '
        'everywhere, and they laughed so hard their tummies hurt.',
    ),
    moral=(
        '{Hero} learned that a rainy day can be a fun day too.',
        '{Hero} learned that you can make the best of things when plans change.',
    ),
    summary='{Hero}\'s plans were spoiled by the rain, but {he} and {friend} found a new way to have fun.',
    titles=('The Rainy Day Picnic', '{Hero} and the Rain', 'Puddles and Picnics'),
    bad_feelings=("sad", "grumpy", "upset"),
    reason="because it was raining",
    good_feelings=("happy", "cheerful", "excited"),
    questions=(
        ("Why could {hero} not play outside?", "{He} could not play outside because it was raining."),
        ("Who played with {hero}?", "{Friend} played with {him}."),
    ),
    places=("house",),
    weather=("rainy",),
    linked=("help", "resolution"),
)

NEW_FRIEND = Plot(
    name="new_friend",
    problem=(
        '{Hero} had just moved to a new home. {He} did not know anyone {at_place}. The other '
        'children were playing together, and {hero} stood alone.',
        'It was {hero}\'s first day {at_place}. Everything was new and big, and {he} did not '
        'have a single friend.',
    ),
    attempt=(
        '{He} wanted to say hello, but {he} felt too {bad}. {He} looked at {his} shoes and '
        'did not say a word.',
        '{He} sat on a bench all by {self}. {He} felt {bad} and wished {he} had someone to play with.',
    ),
    help=(
        'Then {hero} saw {friend_first} sitting alone too. {Hero} remembered what {his} '
        '{helper_rel} said: "A smile is a good way to start." So {he} smiled and walked over.',
        'Then {friend_first} walked past, holding a ball. {Friend} looked a little shy too. '
        '{Hero} took a deep breath and stepped forward.',
    ),
    resolution=(
        '"Hi, I am {hero}," {he} said. "Do you want to play?" {Friend} smiled back. They '
        'played tag and sang songs together until it was time to go home.',
        'They played hide and seek, and then they shared a {food}. {Friend} told funny jokes, '
        'and {hero} laughed and laughed.',
    ),
    moral=(
        'From that day on, {hero} and {friend} were best friends.',
        '{Hero} learned that one kind word can make a new friend.',
        '{Hero} learned that being brave and saying hello is worth it.',
    ),
    summary='{Hero} felt lonely in a new place until {he} made friends with {friend}.',
    titles=('A New Friend', '{Hero} Says Hello', '{Hero} and {Friend}'),
    bad_feelings=("lonely", "shy", "nervous"),
    reason="because {he} did not know anyone",
    good_feelings=("happy", "cheerful", "glad"),
    questions=(
        ("Who became {hero}'s new friend?", "{Friend} became {his} new friend."),
        ("How did {hero} feel at the start?", "{He} felt lonely."),
    ),
    places=("park", "playground", "school", "village"),
    friend_in_opening=False,
)

LEARN_SKILL = Plot(
    name="learn_skill",
    problem=(
        '{Hero} wanted to learn to {skill}. All the bigger children could do it, and {hero} '
        'wanted to do it too.',
        'More than anything, {hero} wished {he} could {skill}. "Today I will learn," {he} said.',
    ),
    attempt=(
        '{Skill_try} {Skill_fail} {Hero} felt {bad}. "I can\'t do it," {he} said.',
        '{Skill_try} {Skill_fail} {He} tried again, and again it did not work. {Hero} felt {bad}.',
    ),
    help=(
        '{His} {helper_rel} knelt down next to {him}. "Nobody can do it the first time," said '
        '{helper}. "Try again, and go slowly."',
        '{Friend_first} watched {him}. "I made lots of mistakes when I learned," said {friend}. '
        '"Keep trying. You are getting better!"',
    ),
    resolution=(
        '{Hero} tried again, and again, and again. Every time it went a little better. '
        '{Skill_win} "I did it!" {hero} shouted.',
        'So {hero} kept practising all afternoon. {Skill_win} Everybody clapped.',
    ),
    moral=(
        '{Hero} learned that practice makes things easier.',
        '{Hero} learned to never give up, even when something is hard.',
    ),
    summary='{Hero} wanted to learn to {skill}, and after many tries {he} finally could.',
    titles=('{Hero} Learns to {Skill_title}', 'Try, Try Again', 'Never Give Up'),
    bad_feelings=("sad", "upset", "grumpy"),
    reason="because {he} could not {skill} yet",
    good_feelings=("proud", "happy", "excited"),
    questions=(
        ("What did {hero} want to learn?", "{He} wanted to learn to {skill}."),
        ("Did {hero} give up?", "No, {he} kept trying until {he} could do it."),
    ),
)

HELP_ANIMAL = Plot(
    name="help_animal",
    problem=(
        '{Hero} was walking {at_place} when {he} heard a tiny sound. It was a little {animal}. '
        '{Hero} looked closely and saw that {animal_problem}.',
        'Near a bush {at_place}, {hero} found a small {animal}. It was shaking, and '
        '{animal_problem}.',
    ),
    attempt=(
        '{Hero} felt {bad} for the little {animal}. {He} wanted to help, but {he} did not know how.',
        '"Poor little {animal}," said {hero}. {He} felt {bad} and did not want to leave it alone.',
    ),
    help=(
        '{Hero} ran to get {his} {helper_rel}. {Helper} came and looked at the {animal}. "We '
        'must be gentle," {h_he} said.',
        '{Friend_first} came to see what was wrong. "We can help it together," said {friend}. '
        '"But we must be very gentle."',
    ),
    resolution=(
        'They made a soft bed in a box and gave the {animal} some water. They took good care '
        'of it, and after a few days the little {animal} was strong and well again.',
        'Slowly and gently, they helped the little {animal}. Soon its mother came looking for '
        'it, and the {animal} went happily back to her.',
    ),
    moral=(
        '{Hero} learned that even the smallest creature needs kindness.',
        '{Hero} was happy that {he} had helped. Being kind felt very good.',
    ),
    summary='{Hero} found a little {animal} in trouble and helped it.',
    titles=('{Hero} and the Little {Animal_title}', 'A Kind Heart', 'The Little {Animal_title}'),
    bad_feelings=("sad", "worried", "sorry"),
    reason="because the little {animal} needed help",
    good_feelings=("happy", "proud", "warm inside"),
    questions=(
        ("What animal did {hero} find?", "{He} found a little {animal}."),
        ("What was wrong with the {animal}?", "{Animal_problem}."),
    ),
    outdoor=True,
)

RACE = Plot(
    name="race",
    problem=(
        'There was a big race {at_place}. {Hero} wanted to win more than anything. {Friend_first} '
        'was in the race too. "Ready, set, go!" shouted {helper}.',
        'All the friends lined up for a race to the big tree. {Hero} and {friend_first} stood '
        'side by side. When they heard "Go!", they ran as fast as they could.',
    ),
    attempt=(
        '{Hero} was in front. Then {he} heard a cry behind {him}. {Friend} had tripped and '
        'fallen down. {F_he} held {f_his} knee. {Hero} felt {bad}.',
        'Halfway to the end, {friend} slipped on the grass and fell. {Hero} stopped. {He} '
        'felt {bad}. If {he} stopped, {he} would not win.',
    ),
    help=(
        '{Hero} thought for a moment. Then {he} turned around and ran back to {friend}. "Are '
        'you okay?" {he} asked, and {he} helped {friend} stand up.',
        '{Hero} did not want to leave {friend} behind. {He} went back and held out {his} hand. '
        '"Come on, we can go together," {he} said.',
    ),
    resolution=(
        'They walked to the end together, hand in hand. They did not win the race, but '
        'everyone clapped for them the loudest.',
        'Together they crossed the line last. {Helper} gave them each a big hug and said, '
        '"That was the kindest thing I have seen all day."',
    ),
    moral=(
        '{Hero} learned that being a good friend is better than winning.',
        '{Hero} learned that helping others is the best way to win.',
    ),
    summary='{Hero} stopped in the middle of a race to help {friend}, who had fallen.',
    titles=('The Big Race', '{Hero} Goes Back', 'Better Than Winning'),
    bad_feelings=("worried", "unsure", "sorry"),
    reason="because {friend} had fallen",
    good_feelings=("proud", "happy", "warm inside"),
    questions=(
        ("Who fell down in the race?", "{Friend} fell down."),
        ("What did {hero} do when {friend} fell?", "{Hero} went back and helped {friend}."),
    ),
    outdoor=True,
    needs_trees=True,
)

GIFT = Plot(
    name="gift",
    problem=(
        'It was almost {his} {helper_rel}\'s birthday. {Hero} wanted to give {helper} a present, '
        'but {he} had no money to buy one.',
        '{Hero} learned that tomorrow was {his} {helper_rel}\'s birthday. "What can I give?" '
        '{he} wondered. {He} had no present at all.',
    ),
    attempt=(
        '{He} looked at {his} toys, but they were old. {He} felt {bad}. "A birthday needs a '
        'present," {he} said.',
        '{He} walked around {at_place} thinking and thinking, but no idea came. {Hero} felt {bad}.',
    ),
    help=(
        '{Friend_first} sat down next to {him}. "The best presents are made with love," said '
        '{friend}. "Why don\'t you make something?"',
        'Then {hero} saw some pretty flowers and a box of crayons. "I know!" {he} said. "I '
        'will make a present myself."',
    ),
    resolution=(
        '{Hero} drew a big picture of {his} family, with a yellow sun and a red heart. {He} '
        'picked some flowers too. When {helper} saw the gift, {h_he} smiled and hugged {hero} tight.',
        '{Hero} made a card with shiny stickers and wrote "I love you" inside. {Helper} read it '
        'and had happy tears in {h_his} eyes. "This is the best present ever," {h_he} said.',
    ),
    moral=(
        '{Hero} learned that a gift from the heart is the best gift of all.',
        '{Hero} learned that love means more than money.',
    ),
    summary='{Hero} had no money for {his} {helper_rel}\'s birthday present, so {he} made one with love.',
    titles=('A Gift for {Helper}', 'The Birthday Present', '{Hero}\'s Special Gift'),
    bad_feelings=("worried", "sad", "unsure"),
    reason="because {he} had no present",
    good_feelings=("happy", "proud", "warm inside"),
    questions=(
        ("Whose birthday was it?", "It was {his} {helper_rel}'s birthday."),
        ("What did {hero} give as a present?", "{He} gave a present that {he} made {self}."),
    ),
)

PLOTS_PART2 = (BROKEN_TOY, RAINY_DAY, NEW_FRIEND, LEARN_SKILL, HELP_ANIMAL, RACE, GIFT)
