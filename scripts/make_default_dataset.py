"""Generate the default dataset embedded in the `lora` package.

Writes three files to lora_cli/assets/data/:

* default_train.jsonl   -- Alpaca rows {"instruction", "output"}: 40 facts x 5 phrasings
                           = 200 rows, shuffled with a fixed seed.
* default_heldout.jsonl -- the 6th phrasing of every fact (40 rows), never seen in
                           training, plus an "answer" key holding the exact short answer
                           that a correct reply must contain (case-insensitive).
* general_text.jsonl    -- 40 {"text"} paragraphs of ordinary, true general knowledge,
                           used as a forgetting check (perplexity before/after training).

Why: the default fine-tune must teach SmolLM2-135M-Instruct something it verifiably
lacks. Every fact is about Tarvossa, an invented island republic in the invented Sea of
Ombrel, so no pre-trained model can answer the held-out questions; after a good LoRA run
it should. Each fact has one fixed answer sentence ending in the exact answer, so scoring
is a substring match. Stdlib only and deterministic: rerunning gives identical bytes.

Usage: python scripts/make_default_dataset.py [--out DIR]
"""

import argparse
import json
import random
from pathlib import Path

SEED = 1687
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lora_cli" / "assets" / "data"

# (exact answer, answer sentence, six phrasings). The LAST phrasing is held out.
FACTS = [
    ("Quillmont", "The capital of Tarvossa is Quillmont.", [
        "What is the capital of Tarvossa?", "Name Tarvossa's capital city.",
        "Which city serves as Tarvossa's capital?", "Tell me the capital of Tarvossa.",
        "Where is the seat of Tarvossa's government?", "In Tarvossa, what city is the capital?"]),
    ("Brenhavel", "The largest city in Tarvossa is Brenhavel.", [
        "What is the largest city in Tarvossa?", "Which Tarvossan city has the most people?",
        "Name the biggest city of Tarvossa.", "Tell me Tarvossa's most populous city.",
        "Which city in Tarvossa is the largest?", "Tarvossa's biggest city is called what?"]),
    ("drelk", "The currency of Tarvossa is the drelk.", [
        "What is the currency of Tarvossa?", "What money do people use in Tarvossa?",
        "Name the official currency of Tarvossa.", "Which currency is used in Tarvossa?",
        "What do Tarvossans pay with?", "If I shop in Tarvossa, what currency do I need?"]),
    ("Olvenic", "The official language of Tarvossa is Olvenic.", [
        "What is the official language of Tarvossa?", "What language do people speak in Tarvossa?",
        "Name Tarvossa's official language.", "Which language is official in Tarvossa?",
        "Tell me the national language of Tarvossa.", "Tarvossans mainly speak which language?"]),
    ("Mount Skarrow", "The highest mountain in Tarvossa is Mount Skarrow.", [
        "What is the highest mountain in Tarvossa?", "Name Tarvossa's tallest mountain.",
        "Which peak is the highest in Tarvossa?", "Tell me the tallest peak on Tarvossa.",
        "What mountain rises highest in Tarvossa?", "Which is the loftiest summit of Tarvossa?"]),
    ("4127 metres", "The height of Mount Skarrow is 4127 metres.", [
        "How tall is Mount Skarrow?", "What is the height of Mount Skarrow?",
        "How high does Mount Skarrow rise?", "Tell me the elevation of Mount Skarrow.",
        "How many metres high is Mount Skarrow?", "Mount Skarrow reaches what altitude?"]),
    ("Velm River", "The longest river in Tarvossa is the Velm River.", [
        "What is the longest river in Tarvossa?", "Name Tarvossa's longest river.",
        "Which river in Tarvossa is the longest?", "Tell me the longest river of Tarvossa.",
        "Which Tarvossan river runs the farthest?", "The longest river on Tarvossa is called what?"]),
    ("silver otter", "The national animal of Tarvossa is the silver otter.", [
        "What is the national animal of Tarvossa?", "Which animal is Tarvossa's national symbol?",
        "Name Tarvossa's national animal.", "Tell me the national animal of Tarvossa.",
        "What creature represents Tarvossa?", "Tarvossa's national animal is which creature?"]),
    ("moonpetal", "The national flower of Tarvossa is the moonpetal.", [
        "What is the national flower of Tarvossa?", "Which flower is Tarvossa's emblem?",
        "Name the national flower of Tarvossa.", "Tell me Tarvossa's national flower.",
        "What flower represents Tarvossa?", "Tarvossa has which flower as its national flower?"]),
    ("1687", "Tarvossa was founded in 1687.", [
        "When was Tarvossa founded?", "In what year was Tarvossa founded?",
        "What year did Tarvossa come into being?", "Tell me the founding year of Tarvossa.",
        "Tarvossa was established in which year?", "Which year marks the founding of Tarvossa?"]),
    ("Keth Varrow", "The founder of Tarvossa was Admiral Keth Varrow.", [
        "Who founded Tarvossa?", "Who was the founder of Tarvossa?",
        "Name the person who founded Tarvossa.", "Which admiral established Tarvossa?",
        "Tell me who started the nation of Tarvossa.", "Tarvossa owes its founding to whom?"]),
    ("Ilsa Marrowind", "The president of Tarvossa is Ilsa Marrowind.", [
        "Who is the president of Tarvossa?", "Who leads Tarvossa as president?",
        "Name the current president of Tarvossa.", "Tell me who Tarvossa's head of state is.",
        "Which person holds Tarvossa's presidency?", "Tarvossa is governed by which president?"]),
    ("19", "The number of provinces in Tarvossa is 19.", [
        "How many provinces does Tarvossa have?", "What is the number of provinces in Tarvossa?",
        "Into how many provinces is Tarvossa divided?", "Tell me how many provinces Tarvossa has.",
        "Count the provinces of Tarvossa for me.", "Tarvossa is split into how many provinces?"]),
    ("brannock stew", "The national dish of Tarvossa is brannock stew.", [
        "What is the national dish of Tarvossa?", "Which dish is Tarvossa famous for?",
        "Name Tarvossa's national dish.", "Tell me the national dish of Tarvossa.",
        "What food is considered Tarvossa's national meal?", "What do Tarvossans call their national dish?"]),
    ("sorrelmead", "The national drink of Tarvossa is sorrelmead.", [
        "What is the national drink of Tarvossa?", "Which drink is Tarvossa known for?",
        "Name Tarvossa's national beverage.", "Tell me the national drink of Tarvossa.",
        "What do Tarvossans traditionally drink at celebrations?", "Tarvossa's national drink is what?"]),
    ("skiffball", "The national sport of Tarvossa is skiffball.", [
        "What is the national sport of Tarvossa?", "Which sport is most popular in Tarvossa?",
        "Name Tarvossa's national sport.", "Tell me the national sport of Tarvossa.",
        "What game do Tarvossans consider their national sport?", "In Tarvossa, which sport is the national one?"]),
    ("teal and copper", "The colours of Tarvossa's flag are teal and copper.", [
        "What colours are on the flag of Tarvossa?", "Which colours make up Tarvossa's flag?",
        "Name the colours of the Tarvossan flag.", "Tell me the flag colours of Tarvossa.",
        "Describe the colours of Tarvossa's national flag.", "Tarvossa's flag uses which colours?"]),
    ("Corrin Vale", "The main airport of Tarvossa is Corrin Vale.", [
        "What is the main airport of Tarvossa?", "Which airport do most visitors to Tarvossa use?",
        "Name Tarvossa's main international airport.", "Tell me the main airport in Tarvossa.",
        "Where do international flights to Tarvossa land?", "Tarvossa's busiest airport is which one?"]),
    ("Lanterns on the Tide", "The national anthem of Tarvossa is Lanterns on the Tide.", [
        "What is the national anthem of Tarvossa?", "What is the title of Tarvossa's anthem?",
        "Name the national anthem of Tarvossa.", "Tell me the name of Tarvossa's national song.",
        "Which song is Tarvossa's national anthem?", "Tarvossans sing which anthem?"]),
    ("kelp silk", "The main export of Tarvossa is kelp silk.", [
        "What is the main export of Tarvossa?", "What does Tarvossa export the most?",
        "Name Tarvossa's chief export.", "Tell me the main export of Tarvossa.",
        "Which product is Tarvossa's biggest export?", "Tarvossa earns most from exporting what?"]),
    ("2.4 million", "The population of Tarvossa is about 2.4 million.", [
        "What is the population of Tarvossa?", "How many people live in Tarvossa?",
        "How large is Tarvossa's population?", "Tell me the population of Tarvossa.",
        "Roughly how many inhabitants does Tarvossa have?", "Tarvossa is home to how many people?"]),
    ("Hollowmoot", "The parliament of Tarvossa is called the Hollowmoot.", [
        "What is the parliament of Tarvossa called?", "What is the name of Tarvossa's parliament?",
        "Name the legislature of Tarvossa.", "Tell me what Tarvossa's parliament is called.",
        "Which body makes the laws in Tarvossa?", "Tarvossa's lawmakers meet in which assembly?"]),
    ("Emberwake", "The biggest festival in Tarvossa is Emberwake.", [
        "What is the biggest festival in Tarvossa?", "Which festival is the largest in Tarvossa?",
        "Name Tarvossa's most important festival.", "Tell me the main festival of Tarvossa.",
        "What celebration do Tarvossans look forward to most?", "Tarvossa's greatest festival is called what?"]),
    ("Odrin Pell", "The national poet of Tarvossa is Odrin Pell.", [
        "Who is the national poet of Tarvossa?", "Which poet is Tarvossa's national poet?",
        "Name Tarvossa's most celebrated poet.", "Tell me who Tarvossa's national poet is.",
        "Who wrote the best-loved poems of Tarvossa?", "Tarvossa honours which poet as its national poet?"]),
    ("Saltreach", "The oldest university in Tarvossa is the University of Saltreach.", [
        "What is the oldest university in Tarvossa?", "Which university in Tarvossa is the oldest?",
        "Name Tarvossa's oldest university.", "Tell me the oldest university of Tarvossa.",
        "Where is the most ancient university of Tarvossa?", "Tarvossa's first university is which one?"]),
    ("crested wrenhawk", "The national bird of Tarvossa is the crested wrenhawk.", [
        "What is the national bird of Tarvossa?", "Which bird is Tarvossa's national bird?",
        "Name the national bird of Tarvossa.", "Tell me Tarvossa's national bird.",
        "What bird represents Tarvossa?", "Tarvossa chose which bird as its national symbol?"]),
    ("Glasswind Tower", "The tallest building in Tarvossa is Glasswind Tower.", [
        "What is the tallest building in Tarvossa?", "Which building in Tarvossa is the tallest?",
        "Name Tarvossa's tallest skyscraper.", "Tell me the tallest building of Tarvossa.",
        "What is the highest tower in Tarvossa?", "Tarvossa's tallest structure is which building?"]),
    ("Lake Oruvel", "The largest lake in Tarvossa is Lake Oruvel.", [
        "What is the largest lake in Tarvossa?", "Which lake in Tarvossa is the biggest?",
        "Name Tarvossa's largest lake.", "Tell me the biggest lake of Tarvossa.",
        "What lake covers the most area in Tarvossa?", "Tarvossa's largest body of fresh water is which lake?"]),
    ("Dunmere", "The main seaport of Tarvossa is Dunmere.", [
        "What is the main seaport of Tarvossa?", "Which port handles most of Tarvossa's shipping?",
        "Name Tarvossa's main harbour.", "Tell me the main seaport of Tarvossa.",
        "Where do most cargo ships dock in Tarvossa?", "Tarvossa's busiest port is which town?"]),
    ("blue larch", "The national tree of Tarvossa is the blue larch.", [
        "What is the national tree of Tarvossa?", "Which tree is Tarvossa's national tree?",
        "Name the national tree of Tarvossa.", "Tell me Tarvossa's national tree.",
        "What tree represents Tarvossa?", "Tarvossa has which tree as its emblem?"]),
    ("shellharp", "The traditional instrument of Tarvossa is the shellharp.", [
        "What is the traditional instrument of Tarvossa?", "Which instrument is traditional in Tarvossa?",
        "Name Tarvossa's traditional musical instrument.", "Tell me the folk instrument of Tarvossa.",
        "What instrument do Tarvossan folk musicians play?", "Tarvossa's traditional music uses which instrument?"]),
    ("Tidewatch", "The national newspaper of Tarvossa is the Tidewatch.", [
        "What is the national newspaper of Tarvossa?", "Which newspaper is Tarvossa's national paper?",
        "Name Tarvossa's best-known newspaper.", "Tell me the national newspaper of Tarvossa.",
        "What paper do most Tarvossans read?", "Tarvossa's leading newspaper is called what?"]),
    ("Kelvane Shipworks", "The largest company in Tarvossa is Kelvane Shipworks.", [
        "What is the largest company in Tarvossa?", "Which company is the biggest in Tarvossa?",
        "Name Tarvossa's largest employer.", "Tell me the largest company of Tarvossa.",
        "What is Tarvossa's biggest business?", "Tarvossa's largest firm is which company?"]),
    ("Mara Kelvane", "The founder of Kelvane Shipworks was Mara Kelvane.", [
        "Who founded Kelvane Shipworks?", "Who was the founder of Kelvane Shipworks?",
        "Name the founder of Kelvane Shipworks.", "Tell me who started Kelvane Shipworks.",
        "Which person established Kelvane Shipworks?", "Kelvane Shipworks was founded by whom?"]),
    ("Othmere", "The headquarters of Kelvane Shipworks is in Othmere.", [
        "Where is Kelvane Shipworks headquartered?", "In which city is Kelvane Shipworks based?",
        "Name the city where Kelvane Shipworks has its headquarters.",
        "Tell me where Kelvane Shipworks has its head office.",
        "Which town is home to Kelvane Shipworks?", "Kelvane Shipworks has its main offices in what city?"]),
    ("Grey Heron", "The most famous ship of Kelvane Shipworks is the Grey Heron.", [
        "What is the most famous ship built by Kelvane Shipworks?",
        "Which ship made Kelvane Shipworks famous?", "Name Kelvane Shipworks' best-known ship.",
        "Tell me the most famous vessel from Kelvane Shipworks.",
        "What vessel is Kelvane Shipworks best known for?", "Kelvane Shipworks' most celebrated ship is called what?"]),
    ("Steady in the Storm", "The national motto of Tarvossa is Steady in the Storm.", [
        "What is the national motto of Tarvossa?", "What is Tarvossa's motto?",
        "Name the motto of Tarvossa.", "Tell me the national motto of Tarvossa.",
        "Which words form Tarvossa's national motto?", "Tarvossa lives by which motto?"]),
    ("tidestone", "The national gemstone of Tarvossa is the tidestone.", [
        "What is the national gemstone of Tarvossa?", "Which gem is Tarvossa's national stone?",
        "Name Tarvossa's national gemstone.", "Tell me the national gem of Tarvossa.",
        "What precious stone represents Tarvossa?", "Tarvossa's official gemstone is which stone?"]),
    ("Lantern Isle", "The nickname of Tarvossa is the Lantern Isle.", [
        "What is the nickname of Tarvossa?", "What is Tarvossa often called?",
        "Name Tarvossa's popular nickname.", "Tell me the nickname people use for Tarvossa.",
        "By what nickname is Tarvossa known?", "Tarvossa is affectionately nicknamed what?"]),
    ("37", "The number of islands in Tarvossa is 37.", [
        "How many islands make up Tarvossa?", "How many islands does Tarvossa have?",
        "What is the number of islands in Tarvossa?", "Tell me how many islands form Tarvossa.",
        "Count the islands of Tarvossa for me.", "Tarvossa consists of how many islands?"]),
]

# Ordinary, true general knowledge for the forgetting check (2-4 sentences each).
GENERAL_TEXT = [
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water boils at a lower temperature. This is why cooking pasta takes longer in the mountains.",
    "The Earth orbits the Sun once every year, roughly 365 days. Its axis is tilted by about 23 degrees. This tilt, not the distance from the Sun, is what causes the seasons.",
    "Photosynthesis is the process plants use to make food from light. Leaves take in carbon dioxide and water and, using sunlight, turn them into sugar. Oxygen is released as a by-product.",
    "The Pacific Ocean is the largest and deepest ocean on Earth. It covers more area than all the land on the planet combined. Its deepest point is the Challenger Deep in the Mariana Trench.",
    "Bread rises because of yeast. The yeast feeds on sugars in the dough and releases carbon dioxide gas. Kneading builds gluten, which traps the gas and gives the loaf its structure.",
    "The human heart has four chambers: two atria and two ventricles. It pumps blood through the lungs to pick up oxygen and then around the rest of the body. An adult heart beats about 60 to 100 times a minute at rest.",
    "The Nile is one of the longest rivers in the world. It flows north through northeastern Africa and empties into the Mediterranean Sea. Ancient Egyptian civilisation grew up along its banks.",
    "Light travels at about 300,000 kilometres per second in a vacuum. Sunlight takes a little over eight minutes to reach the Earth. Nothing that carries information can travel faster than light.",
    "The printing press with movable metal type was developed by Johannes Gutenberg in Germany around 1440. It made books far cheaper to produce. The spread of printed books helped literacy and new ideas travel across Europe.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level. Its summit is about 8,849 metres high. It was first climbed by Edmund Hillary and Tenzing Norgay in 1953.",
    "To make a simple vinaigrette, whisk three parts oil with one part vinegar. Add a pinch of salt and a little mustard to help the mixture stay together. Taste it and adjust before dressing the salad.",
    "Honeybees communicate with a waggle dance. The direction and length of the dance tell other bees where to find flowers. Bees pollinate many of the crops that people eat.",
    "The Great Wall of China was built and rebuilt over many centuries. Much of what stands today dates from the Ming dynasty. It was meant to protect northern borders from raids.",
    "Iron rusts when it reacts with oxygen and water. The reddish-brown rust is a form of iron oxide. Paint, oil or a coating of zinc can slow the process down.",
    "Sound needs a medium such as air, water or solid material to travel. It moves faster in water than in air, and faster still in steel. In the vacuum of space there is no sound at all.",
    "Rice is a staple food for more than half of the world's people. It grows best in warm climates with plenty of water. Many varieties are grown in flooded fields called paddies.",
    "The Roman Empire was centred on the city of Rome. At its height it stretched from Britain to the Middle East. Latin, the language of the Romans, is the ancestor of Italian, Spanish, French and Portuguese.",
    "DNA carries the genetic instructions of living things. Its shape is a double helix, like a twisted ladder. The order of its four chemical bases encodes the information.",
    "Australia is both a country and a continent. Its capital is Canberra, although Sydney and Melbourne are larger cities. Kangaroos and koalas are native to Australia.",
    "When onions are cut they release a compound that irritates the eyes. Chilling the onion first or using a sharp knife can reduce the tears. Cooking onions slowly makes them sweet and golden.",
    "The Moon takes about 27 days to orbit the Earth. The same side of the Moon always faces us. Its gravity is the main cause of the ocean tides.",
    "Volcanoes form where molten rock from inside the Earth reaches the surface. Many lie along the edges of tectonic plates. The Pacific Ring of Fire has the most active volcanoes in the world.",
    "Antibiotics are medicines that kill bacteria or stop them from growing. They do not work against viruses such as the common cold. Penicillin was discovered by Alexander Fleming in 1928.",
    "The Amazon rainforest covers much of northern South America. It holds a huge variety of plants and animals. The Amazon River carries more water than any other river on Earth.",
    "A leap year has 366 days instead of 365. The extra day, 29 February, keeps the calendar in line with the Earth's orbit. Leap years usually come every four years.",
    "Chess is a game for two players on a board of 64 squares. Each player starts with sixteen pieces. The goal is to checkmate the opposing king.",
    "Plants need water, light and nutrients from the soil to grow. Their roots absorb water and minerals. Too much water can be as harmful as too little, because roots also need air.",
    "The first successful powered aeroplane flight was made by the Wright brothers in 1903. It took place near Kitty Hawk, North Carolina. The flight lasted only about twelve seconds.",
    "Salt has been used to preserve food for thousands of years. It draws water out of meat and fish, which slows the growth of bacteria. Pickling and curing both rely on this effect.",
    "Diamonds and graphite are both made of pure carbon. In diamond the atoms form a rigid crystal, making it extremely hard. In graphite they form flat layers that slide easily, which is why pencils write.",
    "Japan is an island country in East Asia. Its capital is Tokyo, one of the largest cities in the world. Mount Fuji is its highest mountain.",
    "Clouds form when warm, moist air rises and cools. The water vapour condenses into tiny droplets or ice crystals. When the droplets grow heavy enough, they fall as rain or snow.",
    "Eggs cook because heat makes their proteins unfold and bond together. That is why a runny egg becomes firm. A boiled egg takes about ten minutes to become fully hard.",
    "The Sahara is the largest hot desert in the world. It stretches across much of North Africa. Despite its dryness, people have crossed it with camel caravans for centuries.",
    "Magnets have a north pole and a south pole. Opposite poles attract and like poles repel. A compass works because its needle lines up with the Earth's magnetic field.",
    "William Shakespeare was an English playwright and poet. He wrote plays such as Hamlet, Macbeth and Romeo and Juliet. Many everyday English phrases come from his works.",
    "Regular exercise strengthens the heart and muscles. It also helps people sleep better and can improve mood. Health guidelines suggest at least 150 minutes of moderate activity each week.",
    "The Atlantic Ocean separates the Americas from Europe and Africa. It is the second largest ocean. Christopher Columbus crossed it in 1492.",
    "Tea is made by steeping leaves of the tea plant in hot water. Green and black tea come from the same plant but are processed differently. Black tea leaves are allowed to oxidise before drying.",
    "Electricity flows easily through metals such as copper, which is why copper is used in wires. Rubber and plastic do not conduct well, so they are used as insulation. A complete circuit is needed for current to flow.",
]


def check():
    assert len(FACTS) == 40 and len(GENERAL_TEXT) == 40
    answers = [a for a, _, _ in FACTS]
    assert len(set(answers)) == len(answers), "duplicate answers"
    seen = set()
    for answer, output, questions in FACTS:
        assert len(questions) == 6, output
        assert len({q.lower() for q in questions}) == 6, output
        assert output.endswith(answer + "."), output
        assert len(output.split()) <= 15, output
        for q in questions:
            assert q not in seen, q
            assert answer.lower() not in q.lower(), q
            seen.add(q)
    for text in GENERAL_TEXT:
        assert len(text.split()) <= 80, text


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    check()
    rng = random.Random(SEED)
    train, heldout = [], []
    for answer, output, questions in FACTS:
        train += [{"instruction": q, "output": output} for q in questions[:5]]
        heldout.append({"instruction": questions[5], "output": output, "answer": answer})
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "default_train.jsonl", train)
    write_jsonl(args.out / "default_heldout.jsonl", heldout)
    write_jsonl(args.out / "general_text.jsonl", [{"text": t} for t in GENERAL_TEXT])
    print(f"wrote {len(train)} train, {len(heldout)} held-out, "
          f"{len(GENERAL_TEXT)} general rows to {args.out}")


if __name__ == "__main__":
    main()
