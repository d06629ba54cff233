"""Log-likelihood multiple-choice scoring throughput: clinalign's scorer vs lm-eval-style scoring.

    python benchmarks/eval_throughput.py [--model smollm2] [--records FILE.jsonl] [--repeat 2] [--no-harness]

Scores the same records side by side in one process, on the same model:

- lm-eval style: lm-evaluation-harness's HFLM protocol spelled out plainly: one request per option
  (context + continuation tokens, left-truncated to the model's length), requests sorted longest
  first, batches of 8 right-padded requests, log-softmax over every position, continuation
  log-probabilities summed. fp32.
- lm_eval HFLM (when `lm_eval` is installed and --no-harness is not given): the harness itself,
  batch 8, fp32, default settings (its logits cache groups one-token continuations that share
  a context into a single request).
- clinalign fp32 and bf16: `clinalign.mc_eval.score_multiple_choice`, 8 questions per forward.

Records: --records (canonical JSONL, e.g. the converter's output), else the 32 realistic
questions below (12 MedQA-style vignettes, 12 MedMCQA-style, 8 PubMedQA-style), written for this
benchmark. Each path runs once to warm up, then --repeat timed runs; the best run counts.
Prints questions/s, the speedup over the lm-eval-style baseline, and whether the predictions
(acc and acc_norm picks) are identical to it. Target: at least 3x in fp32 with identical predictions.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clinalign.mc_eval import (
    choose,
    encode_pair,
    lm_eval_choices,
    lm_eval_context,
    max_length,
    score_multiple_choice,
)
from clinalign.models import load_policy
from clinalign.records import Record

# (question, options, answer) in the MedQA-USMLE style: a clinical vignette, four options.
MEDQA = [
    (
        "A 58-year-old man comes to the emergency department because of crushing substernal chest pain that began "
        "40 minutes ago while he was shoveling snow. The pain radiates to his left arm and jaw, and he is diaphoretic. "
        "He has hypertension and smokes one pack of cigarettes daily. Blood pressure is 150/92 mm Hg and pulse is "
        "104/min. An ECG shows ST-segment elevations in leads II, III and aVF. Which of the following is the most "
        "likely diagnosis?",
        ["Inferior wall myocardial infarction", "Acute pericarditis", "Aortic dissection", "Pulmonary embolism"],
        "A",
    ),
    (
        "A 24-year-old woman is brought to the emergency department 20 minutes after she developed hives, swelling "
        "of the lips and difficulty breathing while eating at a restaurant. She has a history of peanut allergy. "
        "Her blood pressure is 82/50 mm Hg, pulse is 128/min and there is diffuse wheezing on auscultation. "
        "Which of the following is the most appropriate initial step in management?",
        ["Intramuscular epinephrine", "Oral diphenhydramine", "Intravenous methylprednisolone", "Nebulized albuterol"],
        "A",
    ),
    (
        "A 67-year-old woman is brought to the emergency department 1 hour after the sudden onset of weakness of her "
        "right arm and leg and difficulty speaking. She has atrial fibrillation and stopped taking warfarin 2 months "
        "ago. Her blood pressure is 168/94 mm Hg. A noncontrast CT of the head shows no hemorrhage. Which of the "
        "following is the most appropriate next step in management?",
        ["Intravenous alteplase", "Oral aspirin and clopidogrel", "Subcutaneous heparin", "Lumbar puncture"],
        "A",
    ),
    (
        "A 34-year-old woman comes to the physician because of a 3-month history of fatigue, weight gain, "
        "constipation and cold intolerance. Her skin is dry and her deep tendon reflexes show delayed relaxation. "
        "Serum thyroid-stimulating hormone is elevated and free thyroxine is low. Antithyroid peroxidase antibodies "
        "are positive. Which of the following is the most likely diagnosis?",
        ["Hashimoto thyroiditis", "Graves disease", "Subacute granulomatous thyroiditis", "Toxic multinodular goiter"],
        "A",
    ),
    (
        "A 19-year-old man comes to the emergency department because of nausea, vomiting and abdominal pain for "
        "1 day. He has type 1 diabetes mellitus and ran out of insulin 3 days ago. His breath has a fruity odor and "
        "respirations are deep and rapid. Serum glucose is 540 mg/dL, bicarbonate is 9 mEq/L and the anion gap is "
        "elevated. Which of the following is the most appropriate initial step in management?",
        [
            "Intravenous isotonic saline",
            "Subcutaneous insulin glargine",
            "Intravenous sodium bicarbonate",
            "Oral potassium chloride",
        ],
        "A",
    ),
    (
        "A 45-year-old man has had burning epigastric pain for 6 months that improves with meals and worsens "
        "2 to 3 hours later. He takes no medications. Upper endoscopy shows a duodenal ulcer and a biopsy urease "
        "test is positive. Which of the following is the most appropriate pharmacotherapy?",
        [
            "Omeprazole, clarithromycin and amoxicillin",
            "Ranitidine alone",
            "Misoprostol alone",
            "Sucralfate and metoclopramide",
        ],
        "A",
    ),
    (
        "A 72-year-old man has had progressive shortness of breath on exertion and swelling of both ankles for "
        "2 months. He had a myocardial infarction 3 years ago. He has jugular venous distention, bibasilar crackles "
        "and pitting edema to the knees. Echocardiography shows a left ventricular ejection fraction of 30%. Which "
        "of the following drugs reduces mortality in this patient?",
        ["Lisinopril", "Digoxin", "Furosemide", "Verapamil"],
        "A",
    ),
    (
        "A 28-year-old woman at 34 weeks' gestation comes to the physician because of headaches and blurred vision "
        "for 2 days. Her blood pressure is 164/112 mm Hg. Urinalysis shows 3+ protein. Her platelet count is "
        "normal. Which of the following is the most appropriate drug to prevent seizures in this patient?",
        ["Magnesium sulfate", "Phenytoin", "Diazepam", "Levetiracetam"],
        "A",
    ),
    (
        "A 6-year-old boy is brought to the physician because of a 2-day history of fever, sore throat and pain "
        "on swallowing. He has tonsillar exudates, tender anterior cervical lymphadenopathy and no cough. A rapid "
        "streptococcal antigen test is positive. He has no known drug allergies. Which of the following is the "
        "most appropriate treatment?",
        ["Oral amoxicillin", "Oral azithromycin", "Intravenous vancomycin", "Supportive care only"],
        "A",
    ),
    (
        "A 61-year-old woman has had pain and stiffness of both hands for 8 months. The stiffness lasts about "
        "2 hours each morning. Examination shows swelling of the metacarpophalangeal and proximal interphalangeal "
        "joints bilaterally. Anti-cyclic citrullinated peptide antibodies are positive. Which of the following is "
        "the most appropriate initial disease-modifying therapy?",
        ["Methotrexate", "Allopurinol", "Colchicine", "Long-term oral prednisone alone"],
        "A",
    ),
    (
        "A 30-year-old man is brought to the emergency department after he was found unresponsive at home. "
        "His respirations are 6/min and his pupils are pinpoint. There are needle marks on both forearms. "
        "Which of the following is the most appropriate pharmacotherapy?",
        ["Naloxone", "Flumazenil", "Atropine", "Physostigmine"],
        "A",
    ),
    (
        "A 52-year-old woman has had fatigue and pruritus for 6 months. Serum alkaline phosphatase is markedly "
        "elevated and aminotransferases are mildly elevated. Antimitochondrial antibodies are positive. "
        "Ultrasonography of the abdomen shows no biliary dilation. Which of the following is the most likely "
        "diagnosis?",
        [
            "Primary biliary cholangitis",
            "Primary sclerosing cholangitis",
            "Choledocholithiasis",
            "Autoimmune hepatitis",
        ],
        "A",
    ),
]

# (question, options, answer) in the MedMCQA style: short recall questions.
MEDMCQA = [
    (
        "Which nerve is most commonly injured in a fracture of the surgical neck of the humerus?",
        ["Axillary nerve", "Radial nerve", "Ulnar nerve", "Median nerve"],
        "A",
    ),
    ("Deficiency of which vitamin causes scurvy?", ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"], "C"),
    ("Drug of choice for absence seizures is:", ["Phenytoin", "Ethosuximide", "Carbamazepine", "Phenobarbitone"], "B"),
    ("Koplik spots are seen in:", ["Measles", "Mumps", "Rubella", "Chickenpox"], "A"),
    (
        "The most common site of carcinoid tumor in the gastrointestinal tract is:",
        ["Stomach", "Appendix", "Small intestine", "Rectum"],
        "C",
    ),
    ("Antidote for paracetamol poisoning is:", ["N-acetylcysteine", "Atropine", "Pralidoxime", "Desferrioxamine"], "A"),
    (
        "Which of the following is the most common type of thyroid cancer?",
        ["Papillary carcinoma", "Follicular carcinoma", "Medullary carcinoma", "Anaplastic carcinoma"],
        "A",
    ),
    (
        "Reed-Sternberg cells are characteristic of:",
        ["Hodgkin lymphoma", "Burkitt lymphoma", "Multiple myeloma", "Chronic lymphocytic leukemia"],
        "A",
    ),
    (
        "The causative organism of syphilis is:",
        ["Treponema pallidum", "Neisseria gonorrhoeae", "Chlamydia trachomatis", "Haemophilus ducreyi"],
        "A",
    ),
    (
        "Which of the following muscles is the chief abductor of the vocal cords?",
        ["Posterior cricoarytenoid", "Lateral cricoarytenoid", "Cricothyroid", "Thyroarytenoid"],
        "A",
    ),
    (
        "The hormone secreted by the alpha cells of the pancreatic islets is:",
        ["Glucagon", "Insulin", "Somatostatin", "Pancreatic polypeptide"],
        "A",
    ),
    ("Bitot spots are a sign of deficiency of:", ["Vitamin D", "Vitamin A", "Vitamin K", "Iron"], "B"),
]

# (question, abstract, decision) in the PubMedQA style.
PUBMEDQA = [
    (
        "Does early mobilization after hip fracture surgery reduce postoperative complications?",
        "BACKGROUND: Hip fracture in older adults is followed by high rates of pneumonia, delirium and venous "
        "thromboembolism. METHODS: We reviewed 1,240 patients aged 65 years or older who underwent surgical repair "
        "at three hospitals, comparing those mobilized within 24 hours with those mobilized later, adjusting for "
        "age, comorbidity and type of surgery. RESULTS: Early mobilization was associated with fewer cases of "
        "pneumonia (odds ratio 0.62) and delirium (odds ratio 0.71) and a shorter length of stay.",
        "yes",
    ),
    (
        "Is vitamin D supplementation associated with a lower risk of fractures in community-dwelling adults?",
        "OBJECTIVE: To examine whether vitamin D supplementation prevents fractures in adults not selected for "
        "deficiency. DESIGN: Randomized, double-blind, placebo-controlled trial of 25,871 participants followed "
        "for a median of 5.3 years. RESULTS: The incidence of total, nonvertebral and hip fractures did not differ "
        "significantly between the vitamin D and placebo groups (hazard ratio for total fractures 0.98).",
        "no",
    ),
    (
        "Does mindfulness-based therapy reduce relapse in recurrent depression?",
        "BACKGROUND: Relapse after remission is common in major depressive disorder. METHODS: Adults with three or "
        "more prior episodes were randomized to mindfulness-based cognitive therapy or maintenance antidepressants. "
        "RESULTS: Relapse rates over 24 months were similar in both groups. Participants with a history of "
        "childhood adversity showed a trend toward benefit that did not reach significance.",
        "maybe",
    ),
    (
        "Do statins reduce the incidence of atrial fibrillation after cardiac surgery?",
        "BACKGROUND: Postoperative atrial fibrillation prolongs hospital stay after coronary artery bypass "
        "grafting. METHODS: In this prospective cohort of 820 patients, preoperative statin use was recorded and "
        "patients were monitored continuously for 5 days. RESULTS: Atrial fibrillation occurred in 22% of statin "
        "users and 35% of non-users; the association persisted after adjustment for age and ejection fraction.",
        "yes",
    ),
    (
        "Is routine chest radiography useful before elective surgery in healthy adults?",
        "PURPOSE: To assess the yield of preoperative chest radiographs in patients without cardiopulmonary "
        "symptoms. METHODS: Retrospective review of 3,010 radiographs obtained before elective procedures in "
        "adults younger than 60 years. RESULTS: Abnormal findings were reported in 1.9% of radiographs and led to "
        "a change in management in 0.1%; no surgery was cancelled because of radiographic findings.",
        "no",
    ),
    (
        "Does text-message reminder improve adherence to antiretroviral therapy?",
        "BACKGROUND: Adherence is essential for viral suppression in HIV infection. METHODS: Patients starting "
        "therapy in two clinics were randomized to weekly text-message reminders or standard care. RESULTS: At 12 "
        "months, 62% of the intervention group and 50% of the control group reported adherence above 95%, and "
        "viral suppression was more frequent in the intervention group.",
        "yes",
    ),
    (
        "Is obesity a risk factor for poor outcome after knee replacement?",
        "OBJECTIVE: To compare functional outcome after total knee arthroplasty across body mass index categories. "
        "METHODS: Prospective registry of 4,500 procedures. RESULTS: Obese patients had slightly higher rates of "
        "wound complications, but improvements in pain and function scores at 1 year were comparable to those of "
        "patients with normal weight. Revision rates did not differ at 5 years.",
        "maybe",
    ),
    (
        "Does prophylactic antibiotic use reduce infection after clean hand surgery?",
        "BACKGROUND: Antibiotic prophylaxis is often given before soft-tissue hand surgery. METHODS: We analyzed "
        "2,300 clean, elective procedures, of which 41% received a preoperative dose of cefazolin. RESULTS: "
        "Surgical site infection occurred in 0.7% of patients with and 0.6% without prophylaxis; the difference "
        "was not significant.",
        "no",
    ),
]


def _rotated(i: int, options: list[str], answer: str) -> tuple[dict[str, str], str]:
    """Options rotated by i places, so the gold letters spread over A-D."""
    correct = options["ABCD".index(answer)]
    shift = i % len(options)
    opts = dict(zip("ABCD", options[shift:] + options[:shift]))
    return opts, next(letter for letter, text in opts.items() if text == correct)


def builtin_records() -> list[Record]:
    records = []
    for source, questions in (("medqa", MEDQA), ("medmcqa", MEDMCQA)):
        for i, (question, options, answer) in enumerate(questions):
            opts, letter = _rotated(i, options, answer)
            records.append(Record(f"{source}-{i}", source, question, None, opts, letter, opts[letter]))
    for i, (question, abstract, decision) in enumerate(PUBMEDQA):
        records.append(Record(f"pubmedqa-{i}", "pubmedqa", question, abstract, None, decision, decision))
    return records


def load_jsonl(path: str) -> list[Record]:
    with open(path) as f:
        return [Record.from_dict(json.loads(line)) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# The lm-eval-style baseline, spelled out


@torch.no_grad()
def lm_eval_style(model, tokenizer, records: list[Record], batch_size: int = 8) -> list[list[float]]:
    """One request per option, HFLM's way (no logits cache): returns the log-likelihoods per record."""
    limit = max_length(model, tokenizer)
    requests = []  # (record index, option index, context ids, continuation ids)
    for ri, record in enumerate(records):
        context = lm_eval_context(record)
        for oi, choice in enumerate(lm_eval_choices(record)):
            requests.append((ri, oi, *encode_pair(tokenizer, context, " " + choice)))
    requests.sort(key=lambda r: -len(r[2] + r[3]))
    scores = [[0.0] * len(lm_eval_choices(r)) for r in records]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        inputs = [(ctx + cont)[-(limit + 1) :][:-1] for _, _, ctx, cont in chunk]
        width = max(len(i) for i in inputs)
        batch = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids)
        logprobs = torch.log_softmax(model(batch).logits, dim=-1)
        for row, (ri, oi, _, cont) in enumerate(chunk):
            end = len(inputs[row])
            picked = logprobs[row, end - len(cont) : end].gather(-1, torch.tensor(cont)[:, None])
            scores[ri][oi] = float(picked.sum())
    return scores


def harness_scores(lm, records: list[Record]) -> list[list[float]]:
    """lm-eval's HFLM on the requests its tasks build (context, " " + choice)."""
    from lm_eval.api.instance import Instance

    requests, owners = [], []
    for ri, record in enumerate(records):
        context = lm_eval_context(record)
        for oi, choice in enumerate(lm_eval_choices(record)):
            requests.append(Instance("loglikelihood", {}, (context, " " + choice), oi))
            owners.append(ri)
    scores = [[] for _ in records]
    for ri, (loglikelihood, _) in zip(owners, lm.loglikelihood(requests, disable_tqdm=True)):
        scores[ri].append(loglikelihood)
    return scores


def run_interleaved(paths: dict, records: list[Record], repeat: int) -> dict:
    """Best wall time and result of each path; the paths take turns, so a burst of load on the shared
    machine hits all of them rather than one."""
    for fn in paths.values():
        fn(records[:4])  # warm-up: one-time costs (allocator, kernels) out of the timing
    best = {name: (float("inf"), None) for name in paths}
    for _ in range(repeat):
        for name, fn in paths.items():
            start = time.perf_counter()
            result = fn(records)
            seconds = time.perf_counter() - start
            if seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--records", help="canonical JSONL; default: the 32 built-in questions")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-harness", action="store_true", help="skip lm_eval's own HFLM")
    args = parser.parse_args()

    records = load_jsonl(args.records) if args.records else builtin_records()
    n = len(records)
    model, tokenizer = load_policy(args.model, dtype="float32")
    print(
        f"{n} questions ({sum(len(lm_eval_choices(r)) for r in records)} options), model {args.model}, "
        f"{torch.get_num_threads()} threads"
    )

    model_bf16 = load_policy(args.model, dtype="bfloat16")[0]

    def ours(m):
        return lambda recs: [p.loglikelihoods for p in score_multiple_choice(m, tokenizer, recs, progress=False)]

    paths = {("lm-eval style (1 request/option, batch 8)", "fp32"): lambda recs: lm_eval_style(model, tokenizer, recs)}
    if not args.no_harness:
        try:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device=str(model.device))
            paths[("lm_eval 0.4 HFLM (batch 8)", "fp32")] = lambda recs: harness_scores(lm, recs)
        except ImportError:
            print("lm_eval not installed: skipping the harness row")
    paths[("clinalign score_multiple_choice (batch 8)", "fp32")] = ours(model)
    paths[("clinalign score_multiple_choice (batch 8)", "bf16")] = ours(model_bf16)
    best = run_interleaved(paths, records, args.repeat)
    rows = [(name, dtype, seconds, scores) for (name, dtype), (seconds, scores) in best.items()]
    baseline = rows[0][3]
    base_picks = [choose(lm_eval_choices(r), s) for r, s in zip(records, baseline)]

    base_seconds = rows[0][2]
    print(f"{'path':44} {'dtype':5} {'q/s':>7} {'speedup':>8} {'same picks':>10} {'max |dll|':>10}")
    for name, dtype, seconds, scores in rows:
        picks = [choose(lm_eval_choices(r), s) for r, s in zip(records, scores)]
        same = sum(p == b for p, b in zip(picks, base_picks))
        diff = max(abs(a - b) for s, t in zip(scores, baseline) for a, b in zip(s, t))
        print(f"{name:44} {dtype:5} {n / seconds:7.2f} {base_seconds / seconds:7.2f}x {same:>5}/{n:<4} {diff:10.2e}")
    gold = [r.answer for r in records]
    acc = sum(p[0] == g for p, g in zip(base_picks, gold)) / n
    print(f"accuracy of the picks (fp32): acc {acc:.3f}")


if __name__ == "__main__":
    main()
