"""Deterministic, varied English sentences for text models (no data set to download)."""
from __future__ import annotations

_SENTENCES = [
    "The cat sat on the mat.",
    "Rain again.",
    "Could you pass the salt, please?",
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on a small stage.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "I can't believe it's already December!",
    "She finished the marathon in just under four hours, despite a sprained ankle.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Where did you put the keys?",
    "The quick brown fox jumps over the lazy dog.",
    "Our flight was delayed by three hours because of fog in Frankfurt.",
    "He said, \"Don't touch that button\" - and then pressed it himself.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt.",
    "Why do cats purr?",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "The museum's new exhibit features paintings from the Dutch Golden Age.",
    "Please remember to water the plants while I'm away.",
    "A dog is running through a field of tall grass.",
    "Two children are building a sandcastle on the beach.",
    "The senator refused to comment on the allegations.",
    "My laptop battery dies after only an hour; I think it needs replacing.",
    "The orchestra tuned their instruments before the concert began.",
    "Is this seat taken?",
    "Volcanic eruptions can cool the global climate for several years.",
    "The children laughed at the clown's silly tricks.",
    "Lisbon is built on seven hills overlooking the Tagus river.",
    "Refactoring the parser cut the build time in half.",
    "He forgot his umbrella, so he got soaked on the way home.",
    "The committee will meet on Tuesday at 10 a.m. to review the budget.",
    "Bees communicate the location of flowers through a waggle dance.",
    "Wow, what a goal!",
    "The novel follows a young woman who inherits a crumbling estate in Scotland.",
    "A woman is slicing tomatoes in the kitchen.",
    "A person is cutting vegetables with a sharp knife.",
    "The server returned a 503 error during peak traffic.",
    "Migrating birds navigate using the Earth's magnetic field.",
    "I'd rather walk than wait for the bus.",
    "The price of coffee has doubled in the last five years.",
    "After years of research, the team finally published their findings in Nature.",
    "Turn left at the second traffic light, then continue straight for about 500 metres.",
    "Nobody expected the underdog to win the championship.",
    "The baby fell asleep in the car seat.",
    "Glaciers in the Alps are retreating faster than scientists predicted.",
    "Let's grab lunch tomorrow (if you're free).",
    "The password must contain at least eight characters, including a number.",
    "Shakespeare wrote thirty-seven plays and over one hundred and fifty sonnets.",
    "The train to Edinburgh departs from platform nine.",
    "Heavy snowfall closed the mountain pass for three days.",
    "She adopted a grey kitten from the local shelter.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "Honestly? I think the sequel was better than the original.",
    "The farmers' market opens every Saturday morning in the town square.",
    "Electric cars are becoming cheaper as battery costs decline.",
    "He plays chess online every evening after dinner.",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "Our team shipped the new feature two weeks ahead of schedule.",
    "Mix the paint thoroughly before applying the first coat.",
    "A group of tourists is taking photos in front of the cathedral.",
    "The earthquake measured 6.4 on the Richter scale.",
    "Keep calm and carry on.",
    "Scientists discovered a new species of frog in the rainforest of Ecuador.",
    "The library extended its opening hours during exam season.",
]

_TEMPLATES = [
    ("The {a} {b} {c}.",
     ["old", "tired", "curious", "young", "cheerful", "nervous", "famous"],
     ["teacher", "engineer", "farmer", "pilot", "doctor", "journalist", "painter", "chef", "student", "lawyer", "baker"],
     ["quietly read a book in the garden", "repaired the broken fence before noon",
      "argued about politics over dinner", "drove to the coast for the weekend",
      "forgot to lock the front door", "cooked a huge pot of soup for the neighbours",
      "missed the last train home", "wrote a long letter to an old friend",
      "spent the afternoon fishing by the lake", "lost a wallet at the stadium",
      "planted tomatoes along the south wall", "gave a short speech at the wedding",
      "waited patiently in the rain"]),
    ("Did you know that {a} {b}, {c}?",
     ["octopuses", "honeybees", "elephants", "tardigrades", "crows", "dolphins", "camels", "owls", "ants"],
     ["have excellent memories", "can survive extreme conditions", "sleep far less than humans",
      "communicate in surprisingly complex ways", "travel long distances every year",
      "recognise individual human faces", "use simple tools"],
     ["according to a recent study", "even in captivity", "as researchers recently confirmed",
      "which surprised many biologists", "at least under laboratory conditions"]),
    ("In {a}, {b} {c}!",
     ["1969", "the spring of 2004", "late autumn", "the middle of the night", "ancient Egypt",
      "a small village near Kyoto", "the year the war ended"],
     ["a storm", "the whole town", "an unknown inventor", "the football club", "a tiny startup",
      "the local newspaper", "a stray dog", "our grandparents", "the orchestra", "a rival company", "the king"],
     ["changed everything", "made headlines across the country", "surprised absolutely everyone",
      "vanished without a trace", "won against all odds", "broke a long-standing record",
      "started a tradition that lasts to this day", "caused a great deal of confusion",
      "was forgotten within a week", "sparked a heated debate", "became a legend", "moved abroad",
      "closed its doors for good"]),
    ("{a}; however, {b} {c}.",
     ["The meeting ran long", "Sales rose by 12% last quarter", "The bridge was finally reopened",
      "The experiment seemed promising at first", "Tickets sold out within minutes",
      "The new policy was announced on Monday", "The forecast predicted sunshine"],
     ["the results", "most customers", "the critics", "several engineers", "the residents",
      "local officials", "the board", "nobody on the team", "the volunteers", "the reviewers", "investors"],
     ["remained unconvinced", "raised serious concerns about safety", "asked for more time",
      "were unable to reproduce the effect", "complained about the noise", "quietly celebrated anyway",
      "demanded a full refund", "expected a different outcome", "were not impressed",
      "ignored the warnings entirely", "requested an independent review", "said it was too early to tell",
      "changed their minds the next day"]),
]


def _generated():
    """Template sentences; pairwise-coprime slot-list lengths make the first a*b*c rows distinct (CRT)."""
    per_template = [[t.format(a=a[i % len(a)], b=b[i % len(b)], c=c[i % len(c)])
                     for i in range(len(a) * len(b) * len(c))] for t, a, b, c in _TEMPLATES]
    for row in zip(*per_template):  # interleave templates for variety in any prefix
        yield from row


def all_sentences() -> list[str]:
    """Every distinct sentence there is, in ``sentences``' order (calibration text must avoid all of them)."""
    return list(_SENTENCES) + list(_generated())


def sentences(n: int = 256) -> list[str]:
    """``n`` deterministic, varied English sentences (hand-written first, then templated)."""
    out = list(_SENTENCES)
    out.extend(s for s, _ in zip(_generated(), range(n - len(out))))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct sentences available")
    return out[:n]
