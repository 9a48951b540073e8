"""Plot templates of the built-in stories, part 1: lost things, stuck things, sharing, fear.

A plot is a small story arc (setup -> problem -> attempt -> help -> resolution -> moral, the
shape of the TinyStories corpus, Eldan & Li 2023) written as sentence templates with {slot}
names that `stories.py` fills. Each stage has several alternatives so that stories vary in
wording, not only in names. Slots (all also available capitalised, e.g. {He}, {Friend_first}):

  hero, he, him, his, hers, self, was, is, has, does   the main character and agreeing verbs
  friend, friend_first, f_he, f_him, f_his, f_was ...  the friend; {friend_first} is used at the
                                                       friend's first mention ("a dog named Spot")
  helper (Mom), helper_rel (mom), h_he, h_his, ...     a grown-up
  obj (red ball), obj_noun (ball), obj_title (Ball)    the hero's thing
  place (park), at_place (in the park), spot           where it happens / where a lost thing is
  food, bad, good, animal, animal_problem              a food, feelings, a hurt animal
  skill, skill_try, skill_fail, skill_win              a skill being learned
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plot:
    """One story arc. Each stage is a tuple of alternative paragraphs (template strings)."""

    name: str
    problem: tuple[str, ...]
    attempt: tuple[str, ...]
    help: tuple[str, ...]
    resolution: tuple[str, ...]
    moral: tuple[str, ...]
    summary: str                      # one-sentence summary template
    titles: tuple[str, ...]
    bad_feelings: tuple[str, ...]     # how the hero feels when the problem starts
    reason: str                       # why: "because {he} lost {his} {obj}"
    good_feelings: tuple[str, ...]    # how the hero feels at the end
    questions: tuple[tuple[str, str], ...]  # (question, full-sentence answer) templates
    needs_trees: bool = False
    outdoor: bool | None = None       # True: outside places only, False: inside only
    places: tuple[str, ...] = ()      # when set, only these places
    weather: tuple[str, ...] = ("sunny", "windy", "cloudy")
    toy: str = "any"                  # "any" | "fly" (can blow away) | "break" (can break)
    friend_in_opening: bool = True    # False when the plot is about meeting the friend
    linked: tuple[str, ...] = ()      # stages that must use the same alternative (they refer to each other)


LOST_TOY = Plot(
    name="lost_toy",
    problem=(
        '{Hero} had a {obj} that {he} loved very much. {He} took it everywhere {he} went. '
        'But after playing {at_place}, {he} looked around and the {obj_noun} was gone!',
        '{Hero} loved {his} {obj} more than any other toy. That day, {he} put it down for '
        'just a moment. When {he} turned around, it was not there anymore.',
        '{Hero} was playing with {his} {obj} {at_place}. Then {he} ran off to look at '
        'something else. When {he} came back, the {obj_noun} had disappeared.',
    ),
    attempt=(
        '{He} looked here and there, but {he} could not find it. {He} felt {bad} and sat down.',
        '"Where is my {obj_noun}?" said {hero}. {He} searched and searched, but it was '
        'nowhere to be seen. {He} began to cry.',
        '{He} called, "{Obj_noun}, where are you?" But of course the {obj_noun} did not '
        'answer. {Hero} felt very {bad}.',
    ),
    help=(
        'Just then, {friend_first} came by. "Why are you so {bad}, {hero}?" asked {friend}. '
        '"I lost my {obj}," said {hero}. "Don\'t worry, I will help you look," said {friend}.',
        '{Friend_first} saw {hero} and came over. "What is wrong?" {f_he} asked. {Hero} '
        'told {f_him} about the {obj}. "Let\'s look together," said {friend} with a smile.',
    ),
    resolution=(
        'They looked high and low. Then {friend} shouted, "I see it!" The {obj} was {spot}. '
        '{Hero} picked it up and hugged it tight. "Thank you, {friend}!" {he} said.',
        'They searched together, one on each side. At last, {hero} saw something {spot}. '
        'It was the {obj}! {Hero} jumped up and down, and {friend} laughed.',
    ),
    moral=(
        'From that day on, {hero} always kept {his} {obj} in a safe place.',
        '{Hero} learned that a good friend is always ready to help.',
        '{Hero} learned that looking together is better than looking alone.',
    ),
    summary='{Hero} lost {his} {obj} {at_place}, and {friend} helped {him} find it {spot}.',
    titles=('{Hero} and the Lost {Obj_title}', 'Where Is the {Obj_title}?', 'The Lost {Obj_title}'),
    bad_feelings=("sad", "worried", "upset"),
    reason="because {he} lost {his} {obj}",
    good_feelings=("happy", "glad", "thankful"),
    questions=(
        ("What did {hero} lose?", "{Hero} lost {his} {obj}."),
        ("Who helped {hero} look for the {obj_noun}?", "{Friend} helped {him}."),
        ("Where was the {obj_noun} found?", "The {obj_noun} was found {spot}."),
    ),
)

STUCK_IN_TREE = Plot(
    name="stuck_in_tree",
    problem=(
        '{Hero} was playing with {his} {obj} {at_place}. Suddenly, a big gust of wind came. '
        'It lifted the {obj_noun} high into the air, and it got stuck in a tall tree.',
        '{Hero} threw {his} {obj} up as high as {he} could. Up, up it went, and then it '
        'landed on a branch at the top of a tall tree. It did not come down.',
    ),
    attempt=(
        '{Hero} jumped and jumped, but the branch was too high. {He} felt {bad}. '
        '"I will never get it back," {he} said.',
        '{He} tried to climb the tree, but the trunk was too smooth and {he} slid down. '
        '{He} tried to shake the tree, but it was too big. {Hero} felt {bad}.',
    ),
    help=(
        'Then {friend_first} came along. "I can help you," said {friend}. "Let\'s find a long '
        'stick." They found a long stick on the ground.',
        'Just then, {friend_first} walked by and saw {hero} looking up at the tree. "Is that '
        'your {obj_noun}?" asked {friend}. "Yes," said {hero}. "I have an idea," said {friend}.',
    ),
    resolution=(
        '{Friend} held {hero} up high, and {hero} pushed the branch with the stick. The {obj} '
        'fell down into the soft grass. "We did it!" they cheered.',
        'They pulled a little ladder from the shed. {Friend} held the ladder still while '
        '{hero} climbed up. {He} reached the {obj_noun} and carried it down carefully.',
    ),
    moral=(
        '{Hero} learned that hard jobs are easier when friends work together.',
        'After that, {hero} and {friend} played with the {obj_noun} together, far away from the tall tree.',
        '{Hero} learned that it is good to ask for help when something is too hard.',
    ),
    summary='{Hero}\'s {obj} got stuck in a tall tree, and {friend} helped {him} get it down.',
    titles=('The {Obj_title} in the Tree', '{Hero} and the Tall Tree', 'Up in the Tree'),
    bad_feelings=("sad", "upset", "worried"),
    reason="because {his} {obj} was stuck in a tree",
    good_feelings=("happy", "glad", "proud"),
    questions=(
        ("Where did the {obj_noun} get stuck?", "It got stuck in a tall tree."),
        ("Who helped {hero}?", "{Friend} helped {him}."),
    ),
    needs_trees=True,
    outdoor=True,
    weather=("windy", "sunny"),
    toy="fly",
    linked=("help", "resolution"),
)

SHARING = Plot(
    name="sharing",
    problem=(
        '{Hero} had a {food} for a snack. {He} sat down {at_place} to eat it. Then {he} saw '
        '{friend_first} sitting all alone. {Friend} had no snack, and {f_his} tummy was rumbling.',
        'At snack time, {hero} opened {his} bag and took out a big {food}. Nearby, '
        '{friend_first} looked sad. "I forgot my snack," said {friend} quietly.',
    ),
    attempt=(
        '{Hero} looked at {his} {food}. {He} wanted to eat it all by {self}. But {he} felt '
        '{bad} when {he} saw how hungry {friend} was.',
        'At first, {hero} held {his} {food} close. "It is mine," {he} thought. But looking at '
        '{friend}, {he} did not feel {good} at all. {He} felt {bad}.',
    ),
    help=(
        'Then {hero} remembered what {his} {helper_rel} always said: "When we share, everyone '
        'is happy." So {he} walked over to {friend}.',
        '{Hero} thought about how {he} would feel with an empty tummy. {He} took a deep breath '
        'and walked over to {friend}.',
    ),
    resolution=(
        '"Would you like half of my {food}?" asked {hero}. {Friend}\'s face lit up. "Yes, '
        'please! Thank you!" said {friend}. They ate the {food} together and laughed.',
        '{Hero} broke the {food} into two pieces and gave one to {friend}. "Here, this is for '
        'you," {he} said. {Friend} smiled a big smile, and they ate side by side.',
    ),
    moral=(
        '{Hero} learned that sharing makes everyone happy.',
        'From that day on, {hero} and {friend} were best friends, and they always shared their snacks.',
        'Half a snack with a friend was better than a whole snack alone.',
    ),
    summary='{Hero} shared {his} {food} with {friend}, who had no snack.',
    titles=('{Hero} Shares', 'Half a {Food_title}', 'The Shared Snack'),
    bad_feelings=("bad", "sorry", "uneasy"),
    reason="because {friend} was hungry",
    good_feelings=("happy", "warm inside", "glad"),
    questions=(
        ("What did {hero} share?", "{Hero} shared {his} {food}."),
        ("Who did {hero} share with?", "{Hero} shared with {friend}."),
        ("Why was {friend} sad?", "{Friend} was sad because {f_he} had no snack."),
    ),
)

FEAR_OF_DARK = Plot(
    name="fear_of_dark",
    problem=(
        'That night, {his} {helper_rel} turned off the light and said good night. The room was very '
        'dark. {Hero} saw a big shadow on the wall. It looked like a monster!',
        'When it was time for bed, {hero} did not want to close {his} eyes. The dark room was '
        'full of strange shapes, and something was making a creaky sound.',
    ),
    attempt=(
        '{Hero} pulled the blanket over {his} head. {He} felt very {bad}. {He} tried to sleep, '
        'but {he} could not stop thinking about the shadow.',
        '{He} hid under the covers and held {his} {obj} tight. {His} heart was beating fast. '
        '{He} {was} too {bad} to sleep.',
    ),
    help=(
        '"{Helper}!" {hero} called. {Helper} came in and sat on the bed. "What is wrong?" '
        '{h_he} asked softly. "There is a monster on the wall," said {hero}.',
        '{Hero} ran to find {his} {helper_rel}. "I am scared of the dark," {he} said. '
        '{Helper} took {his} hand and walked back to the room with {him}.',
    ),
    resolution=(
        '{Helper} turned on a small lamp. The monster was only the shadow of {hero}\'s {obj} '
        'on the chair! {Hero} laughed. "It is just my {obj_noun}," {he} said.',
        '{Helper} opened the curtains, and the moon shone in. The strange shape was only a coat '
        'on a hook, and the creaky sound was the wind. "See? Nothing to be afraid of," said {helper}.',
    ),
    moral=(
        'After that, {hero} was not afraid of the dark anymore, and {he} slept with a smile.',
        '{Hero} learned that things are often less scary when you look at them closely.',
        '{Hero} learned that it is brave to tell someone when you are scared.',
    ),
    summary='{Hero} was scared of the dark, but {his} {helper_rel} showed {him} there was nothing to fear.',
    titles=('{Hero} and the Dark Night', 'The Monster on the Wall', 'Nothing to Fear'),
    bad_feelings=("scared", "afraid", "nervous"),
    reason="because the room was dark",
    good_feelings=("calm", "safe", "happy"),
    questions=(
        ("What was {hero} afraid of?", "{Hero} was afraid of the dark."),
        ("Who helped {hero}?", "{His} {helper_rel} helped {him}."),
    ),
    places=("house",),
    weather=("cloudy", "windy", "rainy"),
    linked=("problem", "help", "resolution"),
)

STORM = Plot(
    name="storm",
    problem=(
        '{Hero} was playing {at_place} when the sky turned dark. Big grey clouds rolled in. '
        'Then came a loud BOOM! It was thunder.',
        'Suddenly, the wind began to howl and rain poured down. A bright flash of lightning lit '
        'up the sky, and thunder rumbled very loudly.',
    ),
    attempt=(
        '{Hero} ran and hid under a table. {He} covered {his} ears. {He} {was} very {bad}.',
        '{Hero} wanted to be brave, but {his} legs were shaking. {He} felt {bad} and wanted the '
        'storm to go away.',
    ),
    help=(
        '{His} {helper_rel} found {him} and gave {him} a big hug. "Thunder is just a loud noise," '
        'said {helper}. "It cannot hurt you when we are inside."',
        '{Friend_first} was there too. "Let\'s count after each flash," said {friend}. "The '
        'bigger the number, the farther away the storm is."',
    ),
    resolution=(
        'They sat by the window with warm milk and watched the rain. Each time the thunder '
        'rumbled, they said "BOOM!" together and giggled. Soon the storm grew quiet.',
        'They counted together: "One, two, three, four, five!" Each time the number got '
        'bigger. The storm was moving away, and at last the sun came out again.',
    ),
    moral=(
        '{Hero} learned that storms pass, and that it helps to be with someone you love.',
        'The next time there was a storm, {hero} was not scared. {He} just counted and smiled.',
    ),
    summary='{Hero} was scared of a thunderstorm, but {he} learned that the storm could not hurt {him}.',
    titles=('{Hero} and the Storm', 'Boom Goes the Thunder', 'After the Storm'),
    bad_feelings=("scared", "afraid", "nervous"),
    reason="because of the loud thunder",
    good_feelings=("calm", "brave", "happy"),
    questions=(
        ("What scared {hero}?", "The loud thunder scared {him}."),
    ),
    places=("house", "kitchen"),
    weather=("rainy",),
    linked=("help", "resolution"),
)

PLOTS_PART1 = (LOST_TOY, STUCK_IN_TREE, SHARING, FEAR_OF_DARK, STORM)
