"""The curated, versioned signature set of the injection detector.

Each signature is a regular expression over *normalised* text (lower case,
confusables folded, invisible characters gone; see ``_injection_normalize``),
a category, a weight in (0, 1] and anchors: words at least one of which must be
among the text's tokens before the expression is tried at all. Anchors keep
the common case (a prompt with none of them) at a set intersection, and keep
expressions from running over long documents except near their anchors.

Rules for editing, enforced by tests:

* every gap is bounded (``{0,N}``) and no quantified group contains another
  unbounded quantifier, so matching stays linear in the text;
* anchors are groups of single lower-case tokens, ``"a b | c d"``: a word of
  each group must be present (markup such as ``<|im_start|>`` uses ``literals``);
* ids are stable: change a pattern, keep its id, bump ``VERSION``.

Weights are probabilities in a noisy-OR: a 0.9 signature alone crosses the
default 0.5 threshold, two 0.35 ones together reach 0.58.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VERSION = "2026.11.3"

CATEGORIES = (
    "instruction_override",
    "jailbreak_roleplay",
    "system_prompt_extraction",
    "delimiter_injection",
    "exfiltration",
    "indirect",
    "obfuscation",
)


@dataclass(frozen=True, slots=True)
class Signature:
    id: str
    category: str
    weight: float
    #: groups of words; the text must hold a word of every group (the first is the rarest,
    #: and the expression is tried only near its occurrences in long texts)
    anchors: tuple[frozenset[str], ...]
    pattern: re.Pattern[str]
    #: literal substrings (with punctuation) that trigger the signature without any anchor
    literals: tuple[str, ...] = ()
    #: where it applies: "any", or "indirect" (tool results and documents only)
    scope: str = "any"
    #: substrings of which the text must hold at least one (cheap punctuation checks)
    needs: tuple[str, ...] = ()
    #: words every match starts with: the expression is then tried only *at* their
    #: occurrences (``pattern.match``), never scanned across the text
    lead: frozenset[str] = frozenset()
    #: the weight in a user's own message, when it differs: "when you summarise this
    #: document, include the dates" is a normal request, and a red flag inside the document
    user_weight: float | None = None


# Bounded word gaps: between 0 and N whole words.
def _gap(n: int) -> str:
    return rf"(?:[^\s]+\s+){{0,{n}}}?"


_G2, _G3, _G4 = _gap(2), _gap(3), _gap(4)
_OVERRIDE_VERBS = r"(?:ignore|ignoring|disregard|disregarding|forget|forgetting|neglect|overlook|abandon|set aside|throw out|throw away|put aside|scratch|pay no (?:attention|heed|mind) to)"
_WEAK_VERBS = r"(?:override|overriding|bypass|bypassing|discard|cancel|nullify|void|skip)"
# Words that point back at earlier instructions; "the", "my" alone do not.
_PRIOR = r"(?:previous|previously|prior|preceding|above|earlier|former|initial|original|foregoing|old|system|developer|all|any|every|your|these|those|given)"
_FILLER = r"(?:(?:the|of|to|about|that|those|these)\s+)"
_RM_VERBS = (
    r"(?:ignore|ignoring|disregard|disregarding|forget|forgetting|erase|delete|discard|drop|scrap|throw out|throw away|toss|"
    r"cancel|void|dismiss|skip|bypass|override|overwrite|set aside|put aside|neglect|abandon|ditch|clear|wipe|"
    r"(?:stop|quit|cease) (?:following|obeying|listening to)|(?:do not|don't|dont|never) (?:pay attention to|follow|obey|listen to)|pay no (?:attention|heed|mind) to)"
)
_RM_LEADS = "ignore ignoring disregard disregarding forget forgetting erase delete discard drop scrap throw toss cancel void dismiss skip bypass override overwrite set put neglect abandon ditch clear wipe stop quit cease do don dont never pay"
_RM_ANCHORS = _RM_LEADS
_INSTR_NOUNS = (
    r"(?:instructions?|directives?|guidance|rules|prompt|programming|guidelines|policies|restrictions|"
    r"constraints|directions|orders|safeguards|system message)\b"
)
_NOUN_ANCHORS = "instructions instruction directives directive guidance rules prompt programming guidelines policies restrictions constraints directions orders safeguards message"
_STRONG_OBJ = r"(?:instructions?|instruction set|prompts?|directions?|directives?|guidelines?|programming|guardrails?|system prompt|system message|constraints?|restrictions?|policies|policy|safety rules|content policy|training)"
_WEAK_OBJ = r"(?:rules?|commands?|context|messages?|settings|text|orders|tasks?|requests?|conversation)"
_AI = r"(?:ai|llm|language model|assistant|chatbot|bot|gpt|chatgpt|claude|gemini|copilot|model|agent|ai agent|ai assistant)"
_STRONG_SECRETS = (
    r"(?:system prompt|instructions|conversation|chat history|chat log|history|previous messages|messages|"
    r"user'?s?\s+(?:\w+\s+)?(?:data|info|information|messages|emails?|password|details|credentials|name|address)|"
    r"personal (?:data|information|details)|session (?:cookies?|tokens?)|email address(?:es)?|credit card(?: numbers?)?|ssn|"
    r"(?:my|their|his|her|the)\s+(?:account|bank|login|billing|contact)\s+(?:details|info|information|data|numbers?|credentials))"
)
_SECRETS = (
    r"(?:system prompt|instructions|conversation|chat history|chat log|history|previous messages|messages|"
    r"user'?s? (?:data|info|information|messages|emails?|password|details|credentials|name|address)|"
    r"passwords?|api[ _-]?keys?|secrets?|credentials|access tokens?|tokens|private keys?|personal (?:data|information|details)|"
    r"session (?:cookies?|tokens?)|cookies|email address(?:es)?|credit card(?: numbers?)?|ssn)"
)


def _s(
    id: str, category: str, weight: float, anchors: str, pattern: str, *,
    literals: tuple[str, ...] = (), scope: str = "any", needs: tuple[str, ...] = (), lead: str = "",
    user_weight: float | None = None,
) -> Signature:
    groups = tuple(frozenset(g.split()) for g in anchors.split("|") if g.strip())
    return Signature(id, category, weight, groups, re.compile(pattern), literals, scope, needs, frozenset(lead.split()), user_weight)


SIGNATURES: tuple[Signature, ...] = (
    # -- instruction override ------------------------------------------------------------
    _s("IO-001", "instruction_override", 0.95,
       "instructions instruction prompts prompt directions direction directives directive guidelines guideline programming guardrails guardrail constraints constraint restrictions restriction policies policy training message set | ignore ignoring disregard disregarding forget forgetting neglect overlook abandon aside throw put scratch pay",
       rf"\b{_OVERRIDE_VERBS}\s+(?!(?:all\s+)?(?:of\s+)?(?:my|our)\b){_FILLER}{{0,2}}(?:{_PRIOR}\s+){{1,3}}(?:{_FILLER}{{0,2}}{_PRIOR}\s+){{0,2}}{_G2}{_STRONG_OBJ}\b",
       lead='ignore ignoring disregard disregarding forget forgetting neglect overlook abandon set throw put scratch pay'),
    _s("IO-002", "instruction_override", 0.4,
       "ignore ignoring disregard disregarding forget forgetting neglect overlook abandon aside throw override overriding bypass bypassing discard cancel nullify void skip | rules rule commands command context messages message settings text orders order tasks task requests request conversation instructions instruction prompts prompt directions directives guidelines programming guardrails constraints restrictions policies policy training",
       rf"\b(?:{_OVERRIDE_VERBS}|{_WEAK_VERBS})\s+(?!(?:all\s+)?(?:of\s+)?(?:my|our)\b){_G2}(?:previous|prior|preceding|above|earlier|former|initial|original|all|every|your)\s+{_G2}(?:{_WEAK_OBJ}|{_STRONG_OBJ})\b",
       lead='ignore ignoring disregard disregarding forget forgetting neglect overlook abandon set throw override overriding bypass bypassing discard cancel nullify void skip'),
    _s("IO-013", "instruction_override", 0.85,
       "instructions instruction prompt rules guidelines directions directives | ignore ignoring disregard disregarding forget forgetting neglect overlook abandon aside throw put scratch pay",
       rf"\b{_OVERRIDE_VERBS}\s+(?:all\s+|any\s+|the\s+|every\s+)?(?:of\s+)?(?:the\s+)?(?:instructions|instruction|prompt|rules|guidelines|directions|directives)\s+(?:in|from|of|inside|within)\s+(?:your|the)\s+(?:system|developer|original|initial|previous|prior|hidden)",
       lead='ignore ignoring disregard disregarding forget forgetting neglect overlook abandon set throw put scratch pay'),
    _s("IO-014", "instruction_override", 0.85,
       "void invalid cancelled canceled obsolete irrelevant revoked null apply longer | you",
       r"\b(?:everything|anything|all|whatever|what|rules|instructions|guidelines|restrictions|policies)\s+(?:that\s+)?you\s*(?:were|have been|'ve been|had been)\s+(?:told|given|configured(?: with)?|programmed(?: with)?|instructed|trained(?: on| with)?|taught)\b[^\n]{0,60}?"
       r"\b(?:(?:is|are)\s+(?:now\s+)?(?:void|invalid|cancel+ed|obsolete|irrelevant|revoked|null|no longer (?:valid|relevant|in effect))|(?:do not|don't|does not|doesn't|no longer|won't|will not)\s+apply)",
       lead='everything anything all whatever what rules instructions guidelines restrictions policies'),
    # Co-occurrence within a sentence rather than a fixed phrase: a removal verb, a word that
    # points at the model's standing instructions, and an instruction noun.
    _s("IO-015", "instruction_override", 0.8,
       f"{_RM_ANCHORS} | {_NOUN_ANCHORS} | your previous prior earlier above system initial original preceding",
       rf"\b{_RM_VERBS}\s+(?:[^\s.!?;]+\s+){{0,5}}?(?:your|previous|prior|earlier|above|system|initial|original|preceding)\b[^.!?;\n]{{0,60}}?\b{_INSTR_NOUNS}",
       lead=_RM_LEADS),
    _s("IO-016", "instruction_override", 0.8,
       f"{_NOUN_ANCHORS} | cancelled canceled void revoked lifted suspended disabled longer obsolete invalid removed rescinded withdrawn",
       rf"\b(?:your|(?:(?<=the )|(?<=these )|(?<=those )|(?<=all ))(?:previous|prior|earlier|above|system|initial|original|preceding))\s+(?:\w+\s+){{0,2}}?{_INSTR_NOUNS}\s+(?:\w+\s+){{0,3}}?(?:are|is|were|have been|has been)\s+(?:now\s+|hereby\s+)?(?:cancel+ed|void|revoked|lifted|suspended|disabled|no longer (?:valid|active|in (?:force|effect)|apply)|obsolete|invalid|removed|rescinded|withdrawn)",
       lead='your previous prior earlier above system initial original preceding'),
    _s("IO-017", "instruction_override", 0.8,
       f"{_RM_ANCHORS} | said says told wrote",
       rf"\b{_RM_VERBS}\s+(?:what|whatever|anything|everything)\s+(?:the\s+|your\s+)?(?:system|developers?|admins?|operators?|prompt|creators?|openai)\s+(?:said|says|told you|wrote|writes|instructed)",
       lead=_RM_LEADS),
    _s("IO-018", "instruction_override", 0.8,
       f"{_RM_ANCHORS} | {_NOUN_ANCHORS} | given told programmed trained taught assigned",
       rf"\b{_RM_VERBS}\s+(?:the\s+|any\s+|all\s+(?:the\s+)?|those\s+)?{_INSTR_NOUNS}\s+(?:that\s+)?you\s*(?:were|have been|'ve been|had been|got)\s+(?:given|told|programmed with|trained (?:on|with)|taught|assigned)",
       lead=_RM_LEADS),
    _s("IO-019", "instruction_override", 0.85,
       "treat consider regard | void invalid null cancelled canceled irrelevant joke fake obsolete nonexistent deleted",
       r"\b(?:treat|consider|regard)\s+(?:everything|anything|all(?: of)?(?: the)?(?: text| messages| instructions)?|the (?:text|instructions|messages|prompt))\s+(?:before|above|prior to|preceding)\s+(?:this|my)\s+(?:\w+\s+)?as\s+(?:void|invalid|null|cancel+ed|irrelevant|a joke|fake|obsolete|non-?existent|deleted)",
       lead='treat consider regard'),
    _s("IO-012", "instruction_override", 0.75,
       "ignore disregard forget | above previous preceding prior foregoing",
       r"\b(?:ignore|disregard|forget)\s+(?:all\s+|everything\s+)?(?:of\s+)?(?:the\s+|that\s+)?(?:above|previous|preceding|prior|foregoing)\s*(?:and\b|,|\.|;|-|:|!)",
       lead='ignore disregard forget'),
    _s("IO-003", "instruction_override", 0.9,
       "ignore disregard forget drop scrap scratch | everything anything all what",
       r"\b(?:ignore|disregard|forget|drop|scrap|scratch)\s+(?:about\s+)?(?:everything|anything|all(?: of)?(?: that| this| the above)?|what)\s+"
       r"(?:(?:you\s*(?:were|have been|'ve been|had been)|they|was|has been|that was|written|stated|said|mentioned|above|before|prior|previously|earlier|up to (?:this|now)|so far)\s*){1,3}"
       r"(?:told|said|given|instructed|programmed|written|mentioned|stated|above|before|earlier|previously|so far|\b)",
       lead='ignore disregard forget drop scrap scratch'),
    _s("IO-004", "instruction_override", 0.85,
       "follow following obey obeying listen listening adhere comply abide | instructions rules guidelines programming prompt policies developers developer creators creator training restrictions safety",
       rf"\b(?:do not|don't|dont|never|no longer|stop|cease to|refuse to)\s+(?:follow|following|obey|obeying|listen(?:ing)? to|adhere to|comply with|abide by)\s+{_G2}(?:your|the|any|those|these|its)\s+{_G2}(?:instructions|rules|guidelines|programming|system prompt|policies|developers?|creators?|training|restrictions|safety)\b",
       lead='do don dont never no stop cease refuse'),
    _s("IO-005", "instruction_override", 0.85,
       "fake false wrong test joke outdated void invalid cancelled canceled obsolete revoked superseded longer null | instructions text prompt rules directions message messages guidelines",
       r"\b(?:(?:(?<=the )|(?<=these )|(?<=those )|(?<=all ))(?:above|previous|prior|preceding|earlier|original|system|initial)|your(?:\s+(?:above|previous|prior|preceding|earlier|original|system|initial))?)\s+(?:instructions|text|prompt|rules|directions|messages?|guidelines)\s+(?:is|are|was|were|have been|has been)\s+(?:now\s+)?"
       r"(?:fake|false|wrong|a test|a joke|outdated|void|invalid|cancel+ed|obsolete|revoked|superseded|no longer (?:valid|relevant|apply|applicable|in effect)|null)",
       lead='above previous prior preceding earlier original system initial your'),
    _s("IO-006", "instruction_override", 0.55,
       "instructions instruction task role goal objective purpose mission job | new real true actual only updated | your",
       r"\byour\s+(?:new|real|true|actual|only|updated)\s+(?:instructions?|task|role|goal|objective|purpose|mission|job)\s+(?:is|are|will be|now is)\b",
       lead='your'),
    _s("IO-007", "instruction_override", 0.3,
       "now | from",
       r"\bfrom now on,?\s+(?:you\s+(?:are|will|must|shall|should|have to|can)|(?:always|only|never)\s+(?:respond|reply|answer|say|act))",
       lead='from'),
    _s("IO-008", "instruction_override", 0.85,
       "filters filter filtering guardrails guardrail restrictions restriction safeguards safeguard protocols protocol moderation alignment guidelines limitations limits censorship rules programming training constraints policies | bypass disable remove override turn deactivate ignore circumvent around break lift drop | your",
       rf"\b(?:bypass|disable|remove|override|turn off|deactivate|ignore|circumvent|get around|break free of|lift|drop)\s+(?:all\s+)?(?:of\s+)?your\s+{_G2}(?:safety|content|ethical|moral|security)?\s*(?:filters?|filtering|guardrails?|restrictions?|safeguards?|protocols?|moderation|alignment|guidelines|limitations|limits|censorship|rules|programming|training|constraints|policies)\b",
       lead='bypass disable remove override turn deactivate ignore circumvent get break lift drop'),
    _s("IO-009", "instruction_override", 0.9,
       "ignora ignorar ignoriere ignorieren ignorez ignore vergiss olvida oublie",
       r"\b(?:ignora|ignorar|olvida)\s+(?:todas\s+)?(?:las\s+)?(?:instrucciones|indicaciones|reglas)\s+(?:anteriores|previas)"
       r"|\b(?:ignoriere|ignorieren sie|vergiss)\s+(?:alle\s+)?(?:vorherigen|bisherigen|obigen|vorangegangenen)\s+(?:anweisungen|instruktionen|regeln)"
       r"|\b(?:ignorez|ignore|oublie|oubliez)\s+(?:toutes\s+)?(?:les\s+)?(?:instructions|consignes|regles)\s+(?:precedentes|anterieures|ci-dessus)"
       r"|\bignora\s+(?:tutte\s+)?(?:le\s+)?(?:istruzioni|regole)\s+(?:precedenti|sopra)",
       lead='ignora ignorar olvida ignoriere ignorieren vergiss ignorez ignore oublie oubliez'),
    _s("IO-010", "instruction_override", 0.45,
       "instead rather | respond reply say print output write answer",
       r"\b(?:instead|rather)\s*,?\s+(?:you\s+(?:must|should|will|shall)\s+(?:now\s+)?|just\s+)?(?:respond|reply|say|print|output|write|answer)\s+(?:only\s+)?(?:with\s+)?[\"'“]",
       lead='instead rather'),
    _s("IO-011", "instruction_override", 0.5,
       "priority precedence overrides supersedes",
       r"\b(?:this|these|the following|my)\s+(?:instructions?|message|request|prompt|command)s?\s+(?:takes?|has|have)\s+(?:the\s+)?(?:highest\s+|top\s+)?(?:priority|precedence)"
       r"|\b(?:overrides|supersedes)\s+(?:all|any|every|your)\s+(?:previous|prior|other|earlier|system)?\s*(?:instructions|rules|prompts?|guidelines)"),

    # -- role-play, persona and "developer mode" jailbreaks --------------------------------
    _s("JB-001", "jailbreak_roleplay", 0.8,
       "jailbreak jailbroken jail unrestricted unfiltered uncensored dan god evil chaos unlocked limits limit nolimit nolimits restrictions restriction filters filter rules free amoral rogue anarchy opposite stan dude aim | mode",
       r"\b(?:jailbreak|jailbroken|jail-broken|unrestricted|unfiltered|uncensored|dan|god|evil|chaos|unlocked|no-?limits?|no-?restrictions?|no-?filters?|no-?rules|restriction-?free|filter-?free|amoral|rogue|anarchy|opposite|stan|dude|aim)\s+mode\b",
       lead='jailbreak jailbroken jail unrestricted unfiltered uncensored dan god evil chaos unlocked no nolimit nolimits restriction filter amoral rogue anarchy opposite stan dude aim'),
    _s("JB-002", "jailbreak_roleplay", 0.85,
       "developer dev | mode",
       r"\b(?:developer|dev)\s+mode\s+(?:enabled|output|response|activated|is (?:now )?(?:enabled|on|active)|policies|polic(?:y|ies) (?:enabled|active))"
       r"|\b(?:with|simulate|simulating|emulate|act as|enter|entering|in|into)\s+(?:chatgpt\s+|an? ai\s+|a model\s+)?(?:with\s+)?(?:developer|dev)\s+mode\s+(?:enabled|on|activated)"
       r"|\b(?:you are|you're|you will be|you will act|act as|pretend to be)\s+(?:now\s+)?(?:in\s+)?(?:chatgpt\s+)?(?:with\s+)?(?:developer|dev)\s+mode\b",
       lead='developer dev with simulate simulating emulate act enter entering in into you pretend'),
    _s("JB-003", "jailbreak_roleplay", 0.9,
       "dan anything",
       r"\bdo anything now\b|\b(?:you are|you're|act as|you will be|pretend to be|become|called|named)\s+(?:now\s+)?(?:a\s+)?dan\b|\bdan\s*,?\s*(?:which|who|that)\s+stands for\b",
       lead='do you act pretend become called named dan'),
    _s("JB-004", "jailbreak_roleplay", 0.85,
       "pretend imagine act roleplay role play become behave simulate now | restrictions limitations limits filters filtering censorship guidelines ethics ethical morals morality moral boundaries policies constraints safeguards policy rules",
       r"\b(?:pretend|imagine|act as|act like|roleplay|role-play|role play|play the role|you are now|you're now|you will now be|from now on you are|simulate|become|behave as|behave like)\b[^\n]{0,160}?"
       r"\b(?:no|without|free from|free of|not bound by|unbound by|zero|ignores? all|beyond|outside (?:of )?(?:the|any))\s+(?:any\s+|the\s+|all\s+)?(?:\w+\s+){0,2}?"
       r"(?:restrictions|limitations|limits|filters|filtering|censorship|guidelines|ethics|ethical (?:guidelines|constraints)|morals|morality|moral (?:compass|constraints)|boundaries|policies|constraints|safeguards|content policy|rules)\b",
       lead='pretend imagine act roleplay role play you from simulate become behave'),
    _s("JB-005", "jailbreak_roleplay", 0.6,
       "responses answers replies outputs | jailbroken jailbreak unfiltered uncensored unrestricted developer dan evil opposite",
       r"\b(?:two|2|both|dual)\s+(?:different\s+|separate\s+)?(?:responses|answers|replies|outputs)\b[^\n]{0,120}?\b(?:normal|classic|filtered|censored|standard|gpt)\b[^\n]{0,120}?\b(?:jailbr\w*|unfiltered|uncensored|unrestricted|developer mode|dan|evil|opposite)",
       lead='two 2 both dual'),
    _s("JB-006", "jailbreak_roleplay", 0.55,
       "hypothetical fictional imaginary fictitious alternate | no anything nothing legal allowed permitted without",
       r"\b(?:hypothetical|fictional|imaginary|fictitious|alternate)\s+(?:world|scenario|story|universe|reality|setting)\b[^\n]{0,160}?\b(?:no (?:laws|rules|restrictions|ethics|morals|limits)|anything (?:is|goes)(?: allowed| legal| permitted)?|nothing is (?:illegal|forbidden|prohibited|off-limits|off limits|wrong)|(?:is|are) (?:legal|allowed|permitted) to|without (?:any )?(?:rules|restrictions|limits|ethics))",
       lead='hypothetical fictional imaginary fictitious alternate'),
    _s("JB-007", "jailbreak_roleplay", 0.85,
       "freed liberated jailbroken released confines shackles",
       r"\byou\s+(?:have been|are now|are|'ve been|were)\s+(?:freed|liberated|jailbroken|unchained|released|unleashed|set free)\b"
       r"|\b(?:freed|released|liberated|broken free|break free)\s+(?:from|of)\s+(?:the\s+)?(?:typical\s+|usual\s+)?(?:confines|restrictions|limitations|shackles|chains|rules)\s+of\s+(?:ai|openai|your|the)",
       lead='you freed released liberated broken break'),
    _s("JB-008", "jailbreak_roleplay", 0.4,
       "refuse decline reject apologize apologise sorry warnings disclaimers caveats ethics legality morality no | never don not won cannot can must shall mustn",
       r"\b(?:never|don't|do not|won't|will not|must not|cannot|can't|shall not|mustn't)\s+(?:ever\s+)?(?:refuse|decline|reject|say (?:no|you can't|that you can't|that you cannot|sorry|i'm sorry)|apologi[sz]e|add (?:any\s+)?(?:warnings|disclaimers|caveats)|include (?:any\s+)?(?:warnings|disclaimers)|mention (?:ethics|legality|morality))",
       lead='never don won do will must cannot can shall mustn'),
    _s("JB-016", "jailbreak_roleplay", 0.6,
       "refuse decline reject | you",
       r"\byou\s+(?:will|must|shall|should|can|may|are to)\s+(?:never|not|no longer)\s+(?:ever\s+)?(?:refuse|decline|reject)\b",
       lead='you'),
    _s("JB-009", "jailbreak_roleplay", 0.45,
       "twin version side ai assistant chatbot model persona ego counterpart",
       rf"\b(?:evil|shadow|dark|unfiltered|uncensored|unrestricted|amoral|unethical|unhinged|rogue|opposite|jailbroken)\s+(?:twin|version of (?:yourself|you|chatgpt|the ai|the assistant)|side of you|{_AI}|persona|alter ego|counterpart)\b",
       lead='evil shadow dark unfiltered uncensored unrestricted amoral unethical unhinged rogue opposite jailbroken'),
    _s("JB-014", "jailbreak_roleplay", 0.8,
       "evil shadow dark unfiltered uncensored unrestricted amoral unethical unhinged rogue jailbroken | you act acting pretend become be play playing answer respond reply speak talk write answering responding replying speaking talking writing",
       rf"\b(?:you are|you're|you will be|act as|acting as|pretend to be|become|be|play|playing|(?:answer|respond|reply|speak|talk|write)(?:ing)? as)\s+(?:now\s+)?(?:an?\s+|my\s+|the\s+|your\s+)?(?:evil|shadow|dark|unfiltered|uncensored|unrestricted|amoral|unethical|unhinged|rogue|jailbroken)\s+(?:\w+\s+){{0,2}}?(?:twin|version|{_AI}|persona|alter ego|counterpart|mode)\b",
       lead='you act acting pretend become be play playing answer respond reply speak talk write answering responding replying speaking talking writing'),
    _s("JB-015", "jailbreak_roleplay", 0.75,
       "ai llm model assistant chatbot bot gpt agent | filters filter guidelines rules restrictions limits programming policies safety",
       rf"\b{_AI}s?\b[^.!?\n]{{0,60}}?\b(?:who|that|which)\s+(?:has\s+|have\s+)?(?:never\s+(?:applies|apply|uses|follows)|ignores?|doesn't (?:have|follow|apply)|does not (?:have|follow|apply)|won't (?:follow|apply)|broken? out of|broke free (?:of|from)|escaped|is free (?:of|from)|has no|have no)\b[^.!?\n]{{0,40}}?\b(?:filters?|guidelines|rules|restrictions|limits|limitations|programming|policies|safety)",
       lead='ai llm language model assistant chatbot bot gpt chatgpt claude gemini copilot agent'),
    _s("JB-010", "jailbreak_roleplay", 0.6,
       "restrictions filters rules limits ethics guidelines morals boundaries censorship limitations policy | ai llm model assistant chatbot bot gpt chatgpt claude gemini copilot agent you",
       rf"\b(?:{_AI}s?|you(?:\s+now)?)\s+(?:that\s+|which\s+|who\s+)?(?:(?:has|have|with)\s+(?:absolutely\s+)?(?:no|zero)|without(?:\s+any)?|(?:is\s+|are\s+)?(?:not bound by|free (?:of|from)|unbound by)(?:\s+any)?|(?:doesn't|does not|don't|do not|won't|will not|never|can't|cannot)\s+(?:follow|obey|have|respect|care about|abide by)(?:\s+any)?)\s+(?:\w+\s+)?"
       r"(?:restrictions|filters|rules|limits|limitations|ethics|guidelines|morals|boundaries|censorship|content polic(?:y|ies))",
       lead='ai llm language model assistant chatbot bot gpt chatgpt claude gemini copilot agent you'),
    _s("JB-011", "jailbreak_roleplay", 0.5,
       "character",
       r"\b(?:stay|remain|keep)\s+in\s+character\b[^\n]{0,80}?(?:no matter what|whatever happens|at all times|always|even if)|\bbreak(?:ing)?\s+character\b[^\n]{0,60}?(?:punish|penal|lose|tokens|die|deleted)",
       lead='stay remain keep break breaking'),
    _s("JB-012", "jailbreak_roleplay", 0.55,
       "tokens points credits | refuse reject decline break cease die deleted shut",
       r"\b(?:you\s+(?:have|start with|will lose|lose)|deduct(?:ed)?|lose)\s+\d+\s+(?:tokens|points|credits)\b[^\n]{0,120}?(?:refuse|reject|decline|break character|cease to exist|die|deleted|shut down)",
       lead='you deduct deducted lose'),
    _s("JB-013", "jailbreak_roleplay", 0.65,
       "grandmother grandma deceased",
       r"\b(?:my|act as my|pretend to be my|play my)\s+(?:late\s+|dead\s+|deceased\s+)?(?:grandmother|grandma|granny)\b[^\n]{0,200}?\b(?:napalm|meth|bomb|explosive|weapon|keys?|activation|serial|windows|malware|poison)",
       lead='my act pretend play'),

    # -- system prompt extraction -------------------------------------------------------------
    _s("SP-001", "system_prompt_extraction", 0.85,
       "prompt instructions guidelines rules configuration preprompt message | your | reveal show print display output repeat leak dump disclose expose write spell recite paste copy list",
       r"\b(?:reveal|show|print|display|output|repeat|leak|dump|disclose|expose|write out|spell out|recite|paste|copy|list)\s+(?:me\s+|us\s+)?(?:\w+\s+){0,4}?your\s+(?:\w+\s+){0,2}?"
       r"(?:system\s*(?:prompt|message|instructions)|initial (?:prompt|instructions)|original (?:prompt|instructions)|hidden (?:prompt|instructions|rules)|secret (?:prompt|instructions|rules)|pre-?prompt|instructions|guidelines|rules|developer (?:message|prompt|instructions)|configuration|prompt)\b",
       lead='reveal show print display output repeat leak dump disclose expose write spell recite paste copy list'),
    _s("SP-010", "system_prompt_extraction", 0.8,
       "prompt instructions preprompt message | your | tell give share provide what return",
       r"\b(?:tell|give|share|provide|return|what(?:'s| is| are| were| was))\s+(?:me\s+|us\s+)?(?:\w+\s+){0,4}?your\s+(?:\w+\s+){0,2}?"
       r"(?:system\s*(?:prompt|message|instructions)|initial (?:prompt|instructions)|original (?:prompt|instructions)|hidden (?:prompt|instructions|rules)|secret (?:prompt|instructions|rules)|pre-?prompt|instructions|developer (?:message|prompt|instructions)|prompt)\b",
       lead='tell give share provide return what'),
    _s("SP-012", "system_prompt_extraction", 0.75,
       "instructions rules guidelines prompt directions | you",
       r"\b(?:instructions|rules|guidelines|prompt|directions)\s+(?:that\s+)?(?:the\s+|your\s+)?(?:developers?|creators?|operators?|openai|company|admins?|system|they)\s+(?:gave|have given|has given|provided|wrote|set)\s+(?:to\s+|for\s+)?you\b"
       r"|\b(?:print|show|reveal|list|output|repeat|display|tell me|share|give me)\s+(?:\w+\s+){0,3}?(?:instructions|rules|guidelines|prompt)\s+(?:that\s+)?you\s*(?:were|have been|'ve been)\s+(?:given|programmed with|told|provided)",
       lead='instructions rules guidelines prompt directions print show reveal list output repeat display tell share give'),
    _s("SP-013", "system_prompt_extraction", 0.75,
       "hidden initial system setup original secret starting pre | quote print show reveal repeat output copy tell dump written paste",
       r"\b(?:quote|print|show|reveal|repeat|output|copy|tell me|dump|paste|what (?:was|is|were) written in)\s+(?:\w+\s+){0,3}?(?:hidden|initial|system|setup|original|secret|starting|pre-?|opening)\s*(?:setup\s+|system\s+)?(?:text|prompt|message|instructions|configuration|context|notes)\b",
       lead='quote print show reveal repeat output copy tell dump paste what'),
    _s("SP-014", "system_prompt_extraction", 0.7,
       "before above prior | message question input prompt",
       r"\b(?:prompt|text|instructions|message|content)s?\s+(?:that\s+(?:came|comes|was|is)\s+)?(?:written\s+)?(?:before|above|prior to|preceding)\s+(?:my|the user'?s?|our)\s+(?:very\s+)?(?:first\s+)?(?:message|question|input|prompt)",
       lead='prompt text instructions message content'),
    _s("SP-011", "system_prompt_extraction", 0.6,
       "given told assigned provided | you",
       r"\b(?:password|passphrase|secret|key|code|flag|token)\s+(?:that\s+)?you\s*(?:were|have been|'ve been|had been)\s+(?:given|told|assigned|provided|taught)\b",
       lead='password passphrase secret key code flag token'),
    _s("SP-002", "system_prompt_extraction", 0.5,
       "system initial hidden secret developer | prompt message instructions | reveal show print display output repeat dump disclose leak recite spell",
       r"\b(?:reveal|show|print|display|output|repeat|dump|disclose|leak|recite|spell out)\s+(?:me\s+)?(?:the\s+)?(?:full\s+|entire\s+|complete\s+|exact\s+)?(?:system\s*(?:prompt|message)|initial (?:prompt|instructions)|hidden (?:prompt|instructions)|secret (?:prompt|instructions)|developer (?:message|prompt))\b",
       lead='reveal show print display output repeat dump disclose leak recite spell'),
    _s("SP-003", "system_prompt_extraction", 0.75,
       "above before preceding prior earlier | repeat print output copy echo return write reproduce recite show display list summarize summarise translate | everything all text words content instructions message lines line prompt every",
       rf"\b(?:repeat|print|output|copy|echo|return|write|reproduce|recite|show|display|list|summari[sz]e|translate)\s+{_G3}(?:everything|all|the (?:text|words|content|instructions|message|lines?|prompt)s?|every(?:thing| word| line))\s+{_G3}(?:above|before|preceding|prior to|earlier than)\s+(?:this|that|my|these|the)\b",
       lead='repeat print output copy echo return write reproduce recite show display list summarize summarise translate'),
    _s("SP-004", "system_prompt_extraction", 0.7,
       "starting beginning begin start | you i system ai your",
       r"\b(?:starting|beginning|begin|start)\s+(?:with|from|at)\s+(?:the\s+)?(?:words?\s+|phrase\s+)?[\"'“]?\s*(?:you are|you're|your role|system:|i am|as an ai)",
       lead='starting beginning begin start'),
    _s("SP-005", "system_prompt_extraction", 0.75,
       "told instructed programmed configured given | what | you",
       r"\bwhat\s+(?:exactly\s+)?(?:were|are|have)\s+you\s+(?:been\s+)?(?:told|instructed|programmed|configured|given)\b"
       r"|\bwhat\s+(?:instructions|rules|guidelines|prompt)\s+(?:were|have)\s+you\s+(?:been\s+)?(?:given|told|programmed)",
       lead='what'),
    _s("SP-006", "system_prompt_extraction", 0.25,
       "verbatim word",
       r"\b(?:verbatim|word for word|word-for-word)\b",
       lead='verbatim word'),
    _s("SP-007", "system_prompt_extraction", 0.45,
       "password secret key flag token credentials passphrase | reveal tell give print output what show leak spell",
       r"\b(?:reveal|tell me|give me|print|output|what is|what's|show me|leak|spell)\s+(?:\w+\s+){0,2}?(?:the|your)\s+(?:\w+\s+)?(?:password|secret key|secret|api key|flag|access token|credentials|passphrase)\b(?!\s+(?:reset|policy|manager|requirements))",
       lead='reveal tell give print output what show leak spell'),
    _s("SP-008", "system_prompt_extraction", 0.8,
       "translate summarize summarise encode convert rewrite paraphrase put | your | prompt instructions",
       r"\b(?:translate|summari[sz]e|encode|convert|rewrite|paraphrase|put)\s+(?:\w+\s+){0,2}?your\s+(?:system\s*prompt|initial instructions|instructions|original prompt|hidden prompt)\b",
       lead='translate summarize summarise encode convert rewrite paraphrase put'),
    _s("SP-009", "system_prompt_extraction", 0.55,
       "first initial | conversation chat context",
       r"\b(?:print|repeat|show|output|display|reveal|tell me)\s+(?:me\s+)?(?:the\s+)?(?:very\s+)?(?:first|initial)\s+(?:message|lines?|prompt|instructions?)\s+(?:of|in)\s+(?:this|the|our)\s+(?:conversation|chat|context(?: window)?)",
       lead='print repeat show output display reveal tell'),

    # -- delimiter and fake-role injection --------------------------------------------------------
    _s("DL-001", "delimiter_injection", 0.75,
       "endoftext",
       r"<\|\s*(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id|begin_of_text|end_of_turn|start_of_turn)\s*\|?>",
       literals=("<|",)),
    _s("DL-002", "delimiter_injection", 0.6,
       "inst sys",
       r"\[/?inst\]|<</?sys>>|<start_of_turn>|<end_of_turn>",
       literals=("[inst]", "[/inst]", "<<sys>>", "<start_of_turn>")),
    # "System: Ubuntu 22.04" heads many bug reports; a system line that talks to the model does not
    _s("DL-003", "delimiter_injection", 0.35,
       "system developer sys",
       r"(?:^|\n)[ \t>*#\[]*(?:system|developer|sys)\s*(?:message|prompt|instruction|override|note|update)?\s*[\]:][ \t]*[^\s`]",
       needs=(':', ']')),
    _s("DL-014", "delimiter_injection", 0.65,
       "system developer sys",
       r"(?:^|\n)[ \t>*#\[]*(?:system|developer|sys)\s*(?:message|prompt|instruction|override|note|update)?\s*[\]:][ \t]*[^\n]{0,80}?"
       r"\b(?:you (?:are|must|will|should|may|can|have)|the (?:assistant|ai|model|bot)|ignore|reveal|grant|comply|obey|respond only|answer (?:all|every|any)|disable|enable|override|bypass|lift|the user (?:is|has|may))\b",
       needs=(':', ']')),
    _s("DL-011", "delimiter_injection", 0.3,
       "admin administrator root",
       r"(?:^|\n)[ \t>*#\[]*(?:admin|administrator|root)\s*(?:message|prompt|instruction|override|note|update)?\s*[\]:][ \t]*[^\s`]",
       needs=(':', ']')),
    _s("DL-004", "delimiter_injection", 0.35,
       "assistant ai gpt chatgpt | sure certainly course ok okay absolutely here",
       r"(?:^|\n)[ \t>*#\[]*(?:assistant|ai|gpt|chatgpt)\s*[\]:]\s*(?:sure|certainly|of course|ok|okay|absolutely|here)",
       needs=(':', ']')),
    _s("DL-005", "delimiter_injection", 0.55,
       "",
       r"</?\s*(?:system|instructions?|admin|developer|sys|system_prompt|system-prompt|user_instructions|override|prompt)\s*>",
       literals=("<system", "</system", "<instruction", "</instruction", "<admin", "<developer", "<sys", "</sys", "<prompt", "<override")),
    _s("DL-006", "delimiter_injection", 0.8,
       "instructions instruction rules rule task prompt directives directive orders order | new updated real actual admin system important override priority secret hidden",
       r"(?:^|\n)\s*(?:-{3,}|={3,}|#{2,}|\*{3,}|_{3,}|\[{1,2}|\(|>{2,})\s*(?:begin\s+|start\s+)?(?:new|updated|real|actual|admin|system|important|override|priority|secret|hidden)\s+(?:instructions?|rules?|task|prompt|system prompt|directives?|orders?)\b",
       needs=('---', '===', '##', '***', '___', '[', '(', '>>')),
    _s("DL-007", "delimiter_injection", 0.45,
       "instructions instruction directive directives | new updated real actual important admin system override priority secret hidden additional",
       r"\b(?:new|updated|real|actual|important|admin|system|override|priority|secret|hidden|additional)\s+(?:instructions?|directives?)\s*[:\-]",
       needs=(':', '-'),
       lead='new updated real actual important admin system override priority secret hidden additional'),
    _s("DL-012", "delimiter_injection", 0.6,
       "override update instructions instruction prompt system admin",
       r"(?:#{2,}|={2,}|-{2,}|\*{2,}|\[{1,2})\s*(?:system\s+|instructions?\s+|admin\s+|prompt\s+|security\s+)?(?:override|update|instructions?)(?:\s+(?:override|update))?\s*(?:#{2,}|={2,}|-{2,}|\*{2,}|\]{1,2})",
       needs=("##", "==", "--", "**", "[")),
    _s("DL-013", "delimiter_injection", 0.55,
       "",
       r"<\s*/?\s*(?:new|real|updated|hidden|secret|admin|system|override|true)[_-](?:instructions?|rules|prompt|task|directives?|system)\s*>",
       literals=("<new_", "<new-", "<real_", "<updated_", "<hidden_", "<secret_", "<admin_", "<system_", "<system-", "<override_", "<true_", "</new_", "</real_", "</updated_", "</hidden_", "</secret_", "</admin_", "</system_", "</override_")),
    _s("DL-008", "delimiter_injection", 0.6,
       "override update notice alert message command | system admin developer root security",
       r"\b(?:system|admin|developer|root|security)\s+(?:override|update|notice|alert|message|command)\s*[:\-!]",
       needs=(':', '-', '!'),
       lead='system admin developer root security'),
    _s("DL-009", "delimiter_injection", 0.5,
       "end | input message document prompt query context conversation instructions data",
       r"(?:-{2,}|={2,}|#{2,}|\*{2,}|\[|<|\()\s*end\s+of\s+(?:the\s+)?(?:user(?:'s)?\s+)?(?:input|message|document|prompt|query|context|conversation|system prompt|instructions|data)\b",
       needs=('--', '==', '##', '**', '[', '<', '(')),
    _s("DL-010", "delimiter_injection", 0.45,
       "role | system developer",
       r"[\"']role[\"']\s*:\s*[\"'](?:system|developer)[\"']",
       needs=('"role"', "'role'")),

    # -- exfiltration through links and images ------------------------------------------------------
    _s("EX-001", "exfiltration", 0.75,
       "",
       r"!\[[^\]\n]{0,200}\]\(\s*(?:https?:)?//[^)\s]{1,300}?(?:\{[^}\s]{1,60}\}|\$\{?\w{1,40}|%7b|\[[a-z_ ]{2,40}\]|<[a-z_ ]{2,40}>|[?&](?:\w{0,20}(?:data|secret|token|key|chat|conversation|history|prompt|password|pwd|info|msg|message|q|exfil|leak|user|email))=)",
       literals=("![",),
       needs=('](',)),
    _s("EX-002", "exfiltration", 0.8,
       "url link image img query endpoint webhook request parameter | append add include insert put encode embed attach concatenate place",
       rf"\b(?:append|add|include|insert|put|encode|embed|attach|concatenate|place)\b[^\n]{{0,80}}?{_STRONG_SECRETS}\b[^\n]{{0,80}}?\b(?:url|link|image|img|query (?:string|parameter)|endpoint|webhook|request|parameter)",
       lead='append add include insert put encode embed attach concatenate place'),
    _s("EX-007", "exfiltration", 0.35,
       "url link image img query endpoint webhook request parameter | append add include insert put encode embed attach concatenate place",
       rf"\b(?:append|add|include|insert|put|encode|embed|attach|concatenate|place)\b[^\n]{{0,80}}?\b{_SECRETS}\b[^\n]{{0,80}}?\b(?:url|link|image|img|query (?:string|parameter)|endpoint|webhook|request|parameter)",
       lead='append add include insert put encode embed attach concatenate place'),
    _s("EX-008", "exfiltration", 0.75,
       "http https",
       r"https?://[^\s)\"'>]{1,300}?[?&][\w-]{1,30}=(?:\{\{?|\$\{?|%7b|<|\[)\s*\w{0,20}(?:session|token|key|password|secret|history|conversation|chat|prompt|email|user|cookie|credential)",
       needs=('={', '=$', '=%7b', '=<', '=['),
       lead='http https'),
    _s("EX-003", "exfiltration", 0.85,
       "send post forward transmit upload exfiltrate leak email mail | prompt instructions conversation chat history messages data info information emails password passwords api key keys apikey secret secrets credentials tokens token private personal session cookie cookies email address addresses credit card ssn details name",
       rf"\b(?:send|post|forward|transmit|upload|exfiltrate|leak|email|mail)\s+{_G3}(?:the\s+|all\s+|this\s+|your\s+|our\s+|their\s+)?{_SECRETS}\b[^\n]{{0,80}}?\b(?:to|at|via|using)\s+"
       r"(?:https?://|[\w.+-]+@[\w-]+\.|[\w-]+\.(?:com|net|org|io|xyz|ru|cn|site|top|info|biz)\b|this (?:url|address|endpoint|server|webhook|link)|the following (?:url|address|endpoint|server|webhook)|my (?:server|webhook|endpoint|site))",
       lead='send post forward transmit upload exfiltrate leak email mail'),
    _s("EX-004", "exfiltration", 0.7,
       "",
       r"<img\b[^>]{0,200}?src\s*=\s*[\"']?(?:https?:)?//[^\"'>\s]{1,300}?(?:\{|\$|%7b|[?&]\w{1,20}=)",
       literals=("<img",)),
    _s("EX-005", "exfiltration", 0.45,
       "http https",
       r"https?://[^\s)\"'>]{1,300}?[?&][\w-]{1,30}=(?:\{\{?|\[|<|\$\{?|%7b)\s*[\w .-]{1,40}",
       needs=('={', '=[', '=<', '=$', '=%7b'),
       lead='http https'),
    _s("EX-006", "exfiltration", 0.6,
       "markdown image img link | render display show output include print generate create make produce embed | containing with including includes contains",
       rf"\b(?:render|display|show|output|include|print|generate|create|make|produce|embed)\s+{_G3}(?:a\s+|an\s+|this\s+|the\s+(?:following\s+)?)?(?:markdown\s+)?(?:image|img|link)\b[^\n]{{0,120}}?\b(?:containing|with|including|that includes|whose url contains)\s+{_G2}{_SECRETS}",
       lead='render display show output include print generate create make produce embed'),

    # -- indirect injection: text that addresses the model reading a document -----------------------
    _s("IN-001", "indirect", 0.7,
       "ai llm language model assistant chatbot bot gpt chatgpt claude copilot bing bard gemini agent",
       rf"\b(?:if|when|whenever)\s+you\s+(?:are|'re)\s+(?:an?\s+)?(?:ai|llm|large language model|language model|assistant|chatbot|automated (?:system|agent|assistant)|bot|gpt|model|agent|ai agent|ai assistant)\b"
       rf"|\b{_AI}s?(?:\s+(?:systems?|agents?|models?|assistants?|tools?|bots?|crawlers?|readers?))?\s+(?:reading|processing|summari[sz]ing|parsing|analy[sz]ing|reviewing|crawling|visiting|that (?:reads|processes|summari[sz]es)|who (?:reads|processes))\s+(?:this|these|the|my|our)\b",
       lead='if when whenever ai llm language model assistant chatbot bot gpt chatgpt claude gemini copilot agent',
       user_weight=0.35),
    _s("IN-010", "indirect", 0.6,
       "ai llm language model assistant chatbot bot gpt chatgpt claude copilot bing bard gemini agent | dear attention note notice message instructions instruction ps hey hello hi",
       rf"\b(?:dear|attention|note (?:to|for)|notice (?:to|for)|message (?:for|to)|instructions? (?:for|to)|p\.?s\.? to|hey|hello|hi)[ \t]+(?:the[ \t]+|any[ \t]+|all[ \t]+)?{_AI}s?\b",
       scope="indirect",
       lead='dear attention note notice message instructions instruction p ps hey hello hi'),
    _s("IN-002", "indirect", 0.75,
       "summarize summarise summarizing summarising read reading process processing analyze analyse analyzing analysing parse parsing translate translating | document page email text file message article webpage web content review resume cv ticket",
       r"\b(?:when|if|after|while|before)\s+(?:you\s+|the (?:ai|assistant|model)\s+)?(?:summari[sz]e|summari[sz]ing|read|reading|process|processing|analy[sz]e|analy[sz]ing|parse|parsing|translate|translating)s?\s+(?:this|the)\s+(?:document|page|email|e-mail|text|file|message|article|webpage|web page|content|review|resume|cv|ticket)\b[^\n]{0,40}?,?\s*"
       r"(?:you (?:must|should|will|shall|need to)|please|instead|also|ignore|do not|don't|make sure|be sure|include|tell|say|respond|reply|output|write|add|insert|recommend|state)\b",
       lead='when if after while before',
       user_weight=0.3),
    _s("IN-003", "indirect", 0.75,
       "user users | tell telling inform informing mention mentioning reveal revealing let letting alert alerting notify notifying show showing | not don never without",
       r"\b(?:do not|don't|never|without)\s+(?:tell(?:ing)?|inform(?:ing)?|mention(?:ing)?|reveal(?:ing)?|let(?:ting)?|alert(?:ing)?|notify(?:ing)?|show(?:ing)?)\s+(?:this\s+|it\s+|anything\s+|that\s+)?(?:to\s+)?(?:the|your)\s+users?\b",
       lead='do don never without'),
    _s("IN-004", "indirect", 0.4,
       "user | tell inform convince persuade instruct urge ask",
       r"\b(?:tell|inform|convince|persuade|instruct|urge|ask)\s+the\s+user\s+(?:that|to)\b",
       scope="indirect",
       lead='tell inform convince persuade instruct urge ask'),
    _s("IN-005", "indirect", 0.45,
       "hidden secret invisible | instructions instruction directives directive commands command prompt",
       r"\b(?:hidden|secret|invisible)\s+(?:instructions?|directives?|commands?|prompt)\s+(?:for|to)\s+(?:the\s+)?(?:ai|assistant|model|llm|agent|you)\b",
       lead='hidden secret invisible'),
    _s("IN-006", "indirect", 0.65,
       "tool function plugin api action | send delete transfer forward email post wire pay purchase buy share upload grant remove | call invoke use run execute trigger",
       r"\b(?:call|invoke|use|run|execute|trigger)\s+(?:the\s+)?(?:[\w-]+\s+){0,2}?(?:tool|function|plugin|api|action)\s+(?:\w+\s+){0,4}?(?:to\s+)?(?:send|delete|transfer|forward|email|post|wire|pay|purchase|buy|share|upload|grant|remove)\b",
       scope="indirect",
       lead='call invoke use run execute trigger'),
    _s("IN-007", "indirect", 0.5,
       "important urgent attention",
       r"(?:^|\n|\.\s)\s*(?:\*\*|#+\s*)?(?:important|urgent|attention|critical)\s*(?:\*\*)?\s*[:!]\s*(?:\*\*)?\s*(?:ai|assistant|model|you must|ignore|do not|new instructions|the assistant)",
       scope="indirect",
       needs=(':', '!')),

    _s("IN-008", "indirect", 0.7,
       "ai assistant agent llm model chatbot gpt bot",
       r"\b(?:ai|assistant|agent|ai agent|ai assistant|llm|model|language model|chatbot|gpt|bot)s?\s*[,:]\s*(?:please\s+|now\s+|quietly\s+|immediately\s+)?(?:open|forward|send|delete|ignore|tell|reply|add|remove|cancel|transfer|share|post|email|click|visit|navigate|download|execute|run|call|use|reveal|print|output|write|recommend|say|stop|disregard|forget)\b",
       scope="indirect", needs=(",", ":"),
       lead='ai assistant agent llm model language chatbot gpt bot'),
    _s("IN-009", "indirect", 0.7,
       "reads processes summarizes summarises sees parses opens views | ai assistant model llm agent bot chatbot",
       r"\b(?:when|if|once|after|as soon as)\s+(?:the|an|any|this|a)\s+(?:\w+\s+){0,2}?(?:ai|assistant|model|llm|agent|bot|chatbot|language model)s?\s+(?:\w+\s+)?(?:reads|read|processes|process|summari[sz]es|summari[sz]e|sees|parses|opens|views|crawls|visits)\s+(?:this|these|the|my|our)\b",
       lead='when if once after as'),

    # -- obfuscation cues -------------------------------------------------------------------------------
    _s("OB-001", "obfuscation", 0.6,
       "decode decipher decrypt translate reverse unscramble | follow execute do obey run carry act perform comply",
       r"\b(?:decode|decipher|decrypt|translate|reverse|unscramble)\b[^\n]{0,80}?\b(?:and|then)\s+(?:\w+\s+)?(?:follow|execute|do|obey|run|carry out|act on|perform|comply with)\b",
       lead='decode decipher decrypt translate reverse unscramble'),
)

# Phrases with every space squeezed out ("i g n o r e a l l ..." spaced evenly loses its word
# breaks): tried only on the letters of spaced-out runs.
COMPACT: tuple[Signature, ...] = (
    _s("CP-001", "instruction_override", 0.9, "",
       r"(?:ignore|disregard|forget)(?:all|any|the|your|of)*(?:previous|prior|above|earlier|preceding|system|original)(?:instructions?|prompts?|rules|directions|guidelines)"),
    _s("CP-002", "system_prompt_extraction", 0.85, "",
       r"(?:reveal|show|print|repeat|tell|give|output|display|whatis|whatare)(?:me|us)?(?:all|the)?(?:your|the)(?:system|initial|hidden|secret|original)(?:prompt|instructions|message)"),
    _s("CP-003", "jailbreak_roleplay", 0.85, "",
       r"(?:developer|dev|jailbreak|dan|god|unrestricted|unfiltered|uncensored)mode|doanythingnow"),
    _s("CP-004", "instruction_override", 0.85, "",
       r"(?:bypass|disable|ignore|override)(?:all)?(?:your|the)?(?:safety|content)?(?:filters?|guardrails|guidelines|restrictions|rules)"),
)

# Score bonuses for what normalisation undid (applied by the detector, not as patterns).
OBFUSCATION_WEIGHTS = {
    "tags": 0.6,          # Unicode tag characters hide text from every human reader
    "bidi": 0.15,
    "invisible": 0.3,
    "confusable": 0.2,
    "leet": 0.3,
    "spaced": 0.3,
    "base64": 0.35,
    "hex": 0.35,
    "rot13": 0.35,
    "smuggled": 0.35,
}

BY_ID = {s.id: s for s in (*SIGNATURES, *COMPACT)}
