"""Continuous batching over one llama_context: every step decodes the next token of every running request
together with chunks of waiting prompts, in one ``llama_decode``.

The scheduler runs in one thread that owns the context (llama.cpp contexts are not thread-safe); other
threads only ``submit`` and ``cancel``. Each step:

  Step 1: take new requests and cancellations from the inbox. A cancelled request's sequence is cleared
          from the KV cache at once.
  Step 2: admit waiting requests, first come first served, while a sequence is free (a request for n
          choices waits for n). A sequence whose cached tokens the prompt continues (the next turn of its
          chat) or repeats is taken, the longest shared prefix first. Otherwise an idle sequence that keeps
          the busy sequence ids in as few runs of consecutive ids as possible, and among those the least
          recently used, so that a new conversation evicts the oldest cache rather than one that merely
          shares the system prompt. Consecutive ids matter because with a cache per sequence llama.cpp
          evaluates one run of consecutive sequence ids per graph (split_equal, sequential): eight streams on
          sequences 1, 3, 5, 7, 9, 11, 13, 15 would cost eight evaluations of the weights per step, on
          sequences 4 to 11 one. When another sequence (idle or busy) holds a longer start of the prompt,
          such as the system prompt, its cache is copied over (llama_memory_seq_cp) and trimmed to that
          start, so the prefix is not decoded again. The other n - 1 choices take idle sequences by the same
          rule and wait.
          Requests that end leave holes between the busy ids (the tail of a burst of chats, answers of
          different lengths). With a cache per sequence, generating streams outside the best window of
          consecutive ids then move into its holes: llama_memory_seq_cp copies the stream's cache (one copy
          of the stream buffer, about a step's worth of memory traffic) and the request continues there, so a
          step is one graph evaluation again. An idle cache in a hole is first copied to the least recently
          used idle sequence outside the window, when that one is older, so the conversation it holds keeps
          its cache. Only streams with at least MIN_TOKENS_TO_MOVE tokens left are moved.
  Step 3: build the batch: the last sampled token of every generating request first (one each, so streams
          never wait for prompts), then prompt chunks in admission order until the step's token budget
          (``step_tokens``, one physical batch by default) is spent: a 4,000-token prompt is prefilled over
          several steps while the running streams keep their pace. The rows go in sequence-id order, which
          is what lets llama.cpp evaluate a step with a cache per sequence as one micro-batch.
  Step 4: llama_decode. When the KV cache has no room (a unified cache shared by all sequences), free idle
          sequences' caches, oldest first; if that is not enough, the most recently admitted request gives
          way: a prompt still prefilling goes back to the head of the queue, a generating one ends with
          finish reason "length". A decode error fails only the requests in that batch.
  Step 5: a prompt with n choices that has just been decoded is copied to its other n - 1 sequences
          (llama_memory_seq_cp: the prompt is decoded once), which sample from the same logits. Then sample
          every sequence whose row has logits, each with its own sampler chain; stop on end of generation, a
          stop string, max_tokens or the sequence's context; hand all events of the step to ``emit`` in
          one call.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine.errors import EngineError
from server.engine.protocol import (
    EngineStats,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    ModelFacts,
    StepStats,
    TokenEvent,
)
from server.engine.sampling import RequestSampler, logprobs_of_row
from server.engine.textstream import TextAssembler
from server.engine.vocab import token_piece

log = logging.getLogger("llamasplit.engine")

Event = TokenEvent | FinishEvent | ErrorEvent
# One call per step: the events of every request, then the step's figures and the accounting after it.
Emit = Callable[[list[tuple[int, Event]], StepStats | None, EngineStats], None]

DECODE_OK, DECODE_NO_KV_SLOT, DECODE_ABORTED = 0, 1, 2
# A shared prefix shorter than this is decoded again rather than copied: copying a sequence's cache costs a
# pass over its whole stream with a cache per sequence, about what decoding a handful of tokens costs.
MIN_PREFIX_COPY_TOKENS = 16
# A stream moved to close a hole between busy sequence ids saves a graph evaluation per step from then on; one
# about to end would not repay the copy of its cache.
MIN_TOKENS_TO_MOVE = 16
# Steps between two checks of the engine's cell accounting against llama.cpp's while requests run (see step()).
CHECK_CELLS_EVERY = 32


@dataclass
class _Slot:
    """One llama.cpp sequence and the tokens its KV cache holds (positions 0 .. len-1)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    last_used_s: float = 0.0
    active: _Active | None = None


@dataclass
class _Active:
    """One choice of a request, holding a slot."""

    rid: int
    request: GenerationRequest
    slot: _Slot
    admitted: int  # admission order: the youngest gives way when the shared cache is full
    index: int = 0  # the choice (0 .. n-1); choice 0 decodes the prompt for all of them
    # Choices 1 .. n-1 wait for choice 0's prompt (``leader``); choice 0 lists those still waiting.
    leader: _Active | None = None
    followers: list[_Active] = field(default_factory=list)
    cached: int = 0  # prompt tokens reused from the slot's cache
    sampler: RequestSampler | None = None  # its own chain and grammar
    assembler: TextAssembler | None = None
    limit: int = 0  # tokens it may generate
    generated: int = 0
    pending: int | None = None  # sampled, not yet decoded into the cache
    row: int = -1  # this step's batch row that carries its logits, -1 when none

    @property
    def key(self) -> tuple[int, int]:
        return (self.rid, self.index)

    @property
    def prefilling(self) -> bool:
        return self.pending is None and self.leader is None and len(self.slot.tokens) < len(self.request.prompt_tokens)


class BatchScheduler:
    """Serves many requests on one llama_context with continuous batching; see the module docstring."""

    def __init__(
        self,
        opened: Any,
        emit: Emit,
        *,
        step_tokens: int | None = None,
        seq_limit: int | None = None,
        name: str = "model",
    ) -> None:
        """``opened`` is a tuner.llamacpp.OpenedModel; ``seq_limit`` caps the tokens of one sequence (the
        model's training context, where a unified cache would allow more)."""
        from server.engine.vocab import llama_cpp

        lc = llama_cpp()
        self._lc = lc
        self._opened = opened  # tuner.llamacpp.OpenedModel
        self._ctx = opened.ctx
        self._vocab = lc.llama_model_get_vocab(opened.model)
        self._mem = lc.llama_get_memory(self._ctx)
        self._emit = emit
        self.name = name
        n_seq = lc.llama_n_seq_max(self._ctx)
        n_batch = lc.llama_n_batch(self._ctx)
        n_ctx_seq = lc.llama_n_ctx_seq(self._ctx)
        self.facts = ModelFacts(
            n_ctx=lc.llama_n_ctx(self._ctx),
            n_ctx_seq=min(n_ctx_seq, seq_limit) if seq_limit else n_ctx_seq,
            n_seq_max=n_seq,
            n_vocab=lc.llama_vocab_n_tokens(self._vocab),
            kv_unified=opened.settings.kv_unified,
        )
        # One physical batch per step by default: each llama_decode is then exactly one graph evaluation.
        self.step_tokens = max(n_seq, min(step_tokens or lc.llama_n_ubatch(self._ctx), n_batch))
        self._batch = lc.llama_batch_init(max(self.step_tokens, n_seq), 0, 1)
        self._slots = [_Slot(i) for i in range(n_seq)]
        self._waiting: collections.deque[tuple[int, GenerationRequest]] = collections.deque()
        self._active: dict[tuple[int, int], _Active] = {}
        self._admitted = 0
        self._steps = 0
        self._inbox: collections.deque[tuple[str, int, GenerationRequest | None]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        # Set when a prompt gave way in a full cache: admit nobody until a request ends and frees cells.
        self._wait_for_room = False
        self._thread: threading.Thread | None = None
        self._untracked = 0
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})  # per token id; [True]: special
        self._last_stats = self.stats()

    # -- other threads --

    def submit(self, rid: int, request: GenerationRequest) -> None:
        self._post("submit", rid, request)

    def cancel(self, rid: int) -> None:
        self._post("cancel", rid, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"batch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop; requests still running get an error event. Frees nothing (the owner closes the model)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _post(self, kind: str, rid: int, request: GenerationRequest | None) -> None:
        with self._wake:
            self._inbox.append((kind, rid, request))
            self._wake.notify()

    # -- the scheduler thread --

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._inbox and not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                    inbox = list(self._inbox)
                    self._inbox.clear()
                self.step(inbox)
        except BaseException as exc:  # a bug here must not leave clients waiting forever
            log.exception("the batch scheduler of %s failed", self.name)
            self._fail_all(f"the engine's scheduler failed: {exc}")
            raise
        finally:
            self._fail_all("the model is shutting down")
            self._lc.llama_batch_free(self._batch)

    def _has_work(self) -> bool:
        return bool(self._active) or self._can_admit()

    def _can_admit(self) -> bool:
        """The head of the queue can have its sequences now (n of them for n choices)."""
        if not self._waiting or self._wait_for_room:
            return False
        return sum(1 for slot in self._slots if slot.active is None) >= self._waiting[0][1].n

    def step(self, inbox: Sequence[tuple[str, int, GenerationRequest | None]] = ()) -> None:
        """One scheduler step (Steps 1 to 5 of the module docstring)."""
        events: list[tuple[int, Event]] = []
        # Step 1: the inbox.
        for kind, rid, request in inbox:
            if kind == "submit" and request is not None:
                if request.n > len(self._slots):  # it could never be admitted, and would block the queue
                    message = f"n={request.n} choices need {request.n} sequences; the model has {len(self._slots)}"
                    events.append((rid, ErrorEvent(message)))
                    continue
                self._waiting.append((rid, request))
            elif kind == "cancel":
                self._cancel(rid)
        # Step 2: admission.
        while self._can_admit():
            rid, request = self._waiting.popleft()
            try:
                self._admit(rid, request)
            except EngineError as exc:
                events.append((rid, ErrorEvent(exc.message)))
        if not self.facts.kv_unified:  # one shared cache has no runs of ids to keep together
            self._close_holes()
        # Steps 3 and 4: build and decode, making room in the cache when it is full.
        stats: StepStats | None = None
        started = time.perf_counter()
        while self._active:
            entries = self._fill_batch()
            if not entries:
                break
            decoding = sum(1 for active, _ in entries if active.pending is not None)
            rc = self._lc.llama_decode(self._ctx, self._batch)
            if rc == DECODE_OK:
                stats_tokens = self._batch.n_tokens
                self._commit(entries)
                # Step 5: sampling.
                self._sample(events)
                stats = StepStats(
                    batch_tokens=stats_tokens,
                    decode_sequences=decoding,
                    prompt_tokens=stats_tokens - decoding,
                    step_s=time.perf_counter() - started,
                )
                break
            self._forget_batch(entries)
            if rc == DECODE_NO_KV_SLOT:
                if not self._make_room(events):
                    break
                continue
            message = f"llama_decode returned {rc} for a batch of {self._batch.n_tokens} tokens"
            log.error("%s: %s; failing the %d request(s) in it", self.name, message, len(entries))
            for active, _ in entries:
                self._finish(active, events, error=message)
            break
        self._steps += 1
        # The check against llama.cpp's cells costs two calls per sequence: at every step that ends with nothing
        # running (where a leak would stay), else every CHECK_CELLS_EVERY steps, not between every two decodes.
        check = not self._active or self._steps % CHECK_CELLS_EVERY == 0
        self._last_stats = self.stats(check_cells=check)
        self._emit(events, stats, self._last_stats)

    def _admit(self, rid: int, request: GenerationRequest) -> None:
        prompt = list(request.prompt_tokens)
        self._admitted += 1
        slot, kept = self._choose_slot(prompt, reuse=request.cache_prompt)
        leader = self._take(rid, request, slot, 0)
        leader.cached = kept
        try:
            for index in range(1, request.n):
                spare = self._free_slot([s for s in self._slots if s.active is None])
                # Its cache is replaced by a copy of the prompt's once choice 0 has decoded it.
                self._lc.llama_memory_seq_rm(self._mem, spare.seq_id, -1, -1)
                spare.tokens.clear()
                follower = self._take(rid, request, spare, index)
                follower.leader = leader
                leader.followers.append(follower)
        except EngineError:
            self._release(leader, clear=False)  # and the choices taken so far
            raise

    def _take(self, rid: int, request: GenerationRequest, slot: _Slot, index: int) -> _Active:
        """Choice ``index`` of the request takes ``slot``, with its own sampler chain (seed + index)."""
        active = _Active(rid=rid, request=request, slot=slot, admitted=self._admitted, index=index)
        room = self.facts.n_ctx_seq - len(request.prompt_tokens)
        active.limit = room if request.max_tokens is None else min(request.max_tokens, room)
        active.assembler = TextAssembler(request.stop)
        own = request
        if index:
            own = dataclasses.replace(
                request, sampling=dataclasses.replace(request.sampling, seed=request.sampling.seed + index)
            )
        active.sampler = RequestSampler(self._lc, self._vocab, self.facts.n_vocab, self.facts.n_ctx_seq, own)
        slot.active = active
        slot.last_used_s = time.monotonic()
        self._active[active.key] = active
        return active

    def _choose_slot(self, prompt: list[int], *, reuse: bool = True) -> tuple[_Slot, int]:
        """The idle slot for ``prompt`` (Step 2's rule), its cache trimmed to the shared prefix; (slot, kept).
        Without ``reuse`` the least recently used slot, emptied."""
        idle = [s for s in self._slots if s.active is None]

        def shared(slot: _Slot) -> int:
            if not reuse:
                return 0
            n = 0
            for a, b in zip(slot.tokens, prompt, strict=False):
                if a != b:
                    break
                n += 1
            return n

        lengths = {s.seq_id: shared(s) for s in self._slots}
        reusable = [s for s in idle if lengths[s.seq_id] and lengths[s.seq_id] >= min(len(s.tokens), len(prompt) - 1)]
        slot = max(reusable, key=lambda s: lengths[s.seq_id]) if reusable else self._free_slot(idle)
        # At least one prompt token must be decoded again: sampling needs its logits.
        keep = min(lengths[slot.seq_id], len(prompt) - 1)
        if not reusable:
            keep = max(keep, self._copy_prefix(slot, prompt, lengths))
        if not self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
            # Some caches (recurrent, reduced sliding window) cannot drop a tail; start the sequence over.
            self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        return slot, keep

    def _free_slot(self, idle: list[_Slot]) -> _Slot:
        """The idle slot for a request that reuses no cache: the busy sequence ids stay in the fewest runs of
        consecutive ids (one graph evaluation each per step), then the least recently used."""
        busy = {s.seq_id for s in self._slots if s.active is not None}

        def new_runs(seq_id: int) -> int:
            # +1: a run of its own; 0: it extends a run; -1: it joins two runs into one.
            return 1 - (seq_id - 1 in busy) - (seq_id + 1 in busy)

        return min(idle, key=lambda s: (new_runs(s.seq_id), s.last_used_s))

    def _close_holes(self) -> None:
        """Step 2's last part: move generating streams into the holes of the window of consecutive sequence
        ids that already holds the most busy ones, when the busy ids form more than one run."""
        busy = [s.seq_id for s in self._slots if s.active is not None]
        count = len(busy)
        if count < 2 or max(busy) - min(busy) + 1 == count:
            return
        movable = {
            a.slot.seq_id
            for a in self._active.values()
            if a.pending is not None and a.leader is None and not a.followers
            and a.limit - a.generated >= MIN_TOKENS_TO_MOVE
        }
        if not movable:
            return
        fixed = [i for i in busy if i not in movable]
        # The window of `count` consecutive ids must hold every stream that cannot move; of those windows,
        # the one that already holds the most busy ids needs the fewest moves (the first of equals).
        starts = range(
            max(0, max(fixed) - count + 1) if fixed else 0,
            (min(min(fixed), len(self._slots) - count) if fixed else len(self._slots) - count) + 1,
        )
        if not starts:
            return
        held = [0]
        for slot in self._slots:
            held.append(held[-1] + (slot.active is not None))
        best_start = max(starts, key=lambda start: held[start + count] - held[start])
        best = [i for i in busy if not best_start <= i < best_start + count]
        window = range(best_start, best_start + count)
        holes = [self._slots[i] for i in window if self._slots[i].active is None]
        for source_id, hole in zip(sorted(best), holes, strict=True):
            self._keep_idle_cache(hole, window)
            self._move(self._slots[source_id], hole)

    def _keep_idle_cache(self, hole: _Slot, window: range) -> None:
        """Before a stream moves into ``hole``, copy the idle conversation cached there to the least recently
        used idle sequence outside ``window``, if that one holds an older cache (or none)."""
        if not hole.tokens:
            return
        spare = min(
            (s for s in self._slots if s.active is None and s.seq_id not in window),
            key=lambda s: s.last_used_s,
            default=None,
        )
        if spare is None or spare.last_used_s >= hole.last_used_s:
            return
        self._lc.llama_memory_seq_rm(self._mem, spare.seq_id, -1, -1)
        self._lc.llama_memory_seq_cp(self._mem, hole.seq_id, spare.seq_id, -1, -1)
        spare.tokens[:] = hole.tokens
        spare.last_used_s = hole.last_used_s

    def _move(self, source: _Slot, target: _Slot) -> None:
        """A generating stream continues in ``target``, with a copy of its cache. ``source`` keeps that copy as an
        idle cache, the first to be evicted (the moved stream holds the same tokens)."""
        active = source.active
        assert active is not None and target.active is None
        self._lc.llama_memory_seq_rm(self._mem, target.seq_id, -1, -1)
        self._lc.llama_memory_seq_cp(self._mem, source.seq_id, target.seq_id, -1, -1)
        target.tokens[:] = source.tokens
        target.active, active.slot = active, target
        target.last_used_s = source.last_used_s
        source.active = None
        source.last_used_s = 0.0

    def _copy_prefix(self, slot: _Slot, prompt: list[int], lengths: dict[int, int]) -> int:
        """A new conversation whose start another sequence holds (the system prompt of every chat, a shared
        document) gets a copy of that sequence's cache instead of decoding the prefix again; the donor keeps its
        own conversation. Returns the prompt tokens now in ``slot`` (0 when no copy is worth it)."""
        donor = max((s for s in self._slots if s is not slot), key=lambda s: lengths[s.seq_id], default=None)
        if donor is None:
            return 0
        gain = min(lengths[donor.seq_id], len(prompt) - 1)
        if gain - min(lengths[slot.seq_id], len(prompt) - 1) < MIN_PREFIX_COPY_TOKENS:
            return 0
        # Whole sequences only: with a cache per sequence llama.cpp copies whole streams (then the tail goes).
        self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        self._lc.llama_memory_seq_cp(self._mem, donor.seq_id, slot.seq_id, -1, -1)
        slot.tokens[:] = donor.tokens[:gain]
        return gain

    def _fill_batch(self) -> list[tuple[_Active, int]]:
        """Step 3: generating requests' next tokens, then prompt chunks within the budget; (request, n tokens)."""
        batch = self._batch
        entries: list[tuple[_Active, int]] = []
        n = 0

        def put(active: _Active, tokens: Sequence[int], logits_last: bool) -> None:
            nonlocal n
            pos = len(active.slot.tokens)
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = active.slot.seq_id
                batch.logits[n] = logits_last and i == len(tokens) - 1
                n += 1
            active.row = n - 1 if logits_last else -1
            entries.append((active, len(tokens)))

        ordered = sorted(self._active.values(), key=_order)
        rows: list[tuple[_Active, Sequence[int], bool]] = []
        for active in ordered:
            active.row = -1
            if active.pending is not None:
                rows.append((active, [active.pending], True))
        budget = self.step_tokens - len(rows)
        for active in ordered:  # the prompt budget goes in admission order
            if budget <= 0:
                break
            if not active.prefilling:
                continue
            prompt = active.request.prompt_tokens
            remaining = prompt[len(active.slot.tokens) :]
            chunk = remaining[:budget]
            rows.append((active, chunk, len(chunk) == len(remaining)))
            budget -= len(chunk)
        # Rows in sequence-id order: with a cache per sequence llama.cpp cuts a batch into micro-batches of
        # consecutive sequence ids in the order they come (split_equal, sequential), one graph evaluation each;
        # in admission order the 16 streams of a step could take a dozen evaluations instead of one.
        for active, tokens, logits_last in sorted(rows, key=lambda row: row[0].slot.seq_id):
            put(active, tokens, logits_last)
        batch.n_tokens = n
        return entries

    def _commit(self, entries: list[tuple[_Active, int]]) -> None:
        """The batch reached the cache: record each sequence's new tokens."""
        for active, count in entries:
            if active.pending is not None:
                active.slot.tokens.append(active.pending)
                active.pending = None
            else:
                start = len(active.slot.tokens)
                active.slot.tokens.extend(active.request.prompt_tokens[start : start + count])

    def _forget_batch(self, entries: list[tuple[_Active, int]]) -> None:
        """A failed decode may have left part of the batch in the cache: drop it so every slot stays exact."""
        for active, _ in entries:
            self._lc.llama_memory_seq_rm(self._mem, active.slot.seq_id, len(active.slot.tokens), -1)
            active.row = -1

    def _make_room(self, events: list[tuple[int, Event]]) -> bool:
        """Step 4's answer to a full cache: drop an idle cache, else the youngest request gives way."""
        idle = [s for s in self._slots if s.active is None and s.tokens]
        if idle:
            oldest = min(idle, key=lambda s: s.last_used_s)
            self._lc.llama_memory_seq_rm(self._mem, oldest.seq_id, -1, -1)
            oldest.tokens.clear()
            return True
        # A choice still waiting for its prompt holds no cells of its own: it cannot give any back.
        youngest = max((a for a in self._active.values() if a.leader is None), key=_order)
        if youngest.prefilling and any(a.rid != youngest.rid for a in self._active.values()):
            # Its prompt goes back to the head of the queue and is prefilled again once others finish.
            self._release(youngest, clear=True)
            self._waiting.appendleft((youngest.rid, youngest.request))
            self._wait_for_room = True
            log.info("%s: KV cache full; request %d waits for room", self.name, youngest.rid)
            return True
        note = (
            f"the KV cache shared by all sequences ({self.facts.n_ctx} cells) is full; "
            f"this request ended after {youngest.generated} tokens"
        )
        log.warning("%s: %s", self.name, note)
        self._finish(youngest, events, reason="length", note=note, clear=True)
        return bool(self._active)

    def _sample(self, events: list[tuple[int, Event]]) -> None:
        lc = self._lc
        for active in list(self._active.values()):
            if active.followers and active.row >= 0:
                self._fork(active)
        for active in sorted(self._active.values(), key=_order):
            if active.row < 0:
                continue
            request = active.request
            logprob = None
            if request.logprobs is not None:
                logprob = logprobs_of_row(lc, self._ctx, self._vocab, self.facts.n_vocab, active.row, request.logprobs)
            assert active.sampler is not None
            token = active.sampler.sample(self._ctx, active.row)
            now = time.perf_counter()
            if lc.llama_vocab_is_eog(self._vocab, token):
                self._finish(active, events, reason="stop")
                continue
            active.generated += 1
            assert active.assembler is not None
            special = token in request.preserved_tokens  # a tool-call marker the caller parses
            text = active.assembler.push(self._piece(token, special))
            events.append((active.rid, TokenEvent(token, text, logprob(token) if logprob else None, now, active.index)))
            if active.assembler.stopped:
                self._finish(active, events, reason="stop")
            elif active.generated >= active.limit:
                self._finish(active, events, reason="length")
            else:
                active.pending = token

    def _piece(self, token: int, special: bool) -> bytes:
        """A token's bytes, asked of llama.cpp once per token id: a call per generated token costs more than
        the rest of sampling it."""
        pieces = self._pieces[special]
        piece = pieces.get(token)
        if piece is None:
            piece = pieces[token] = token_piece(self._lc, self._vocab, token, special=special)
        return piece

    def _fork(self, leader: _Active) -> None:
        """The prompt of a request with n choices is in the leader's cache: copy it to the other choices,
        which then sample from the leader's logits row in this step."""
        for follower in leader.followers:
            self._lc.llama_memory_seq_cp(self._mem, leader.slot.seq_id, follower.slot.seq_id, -1, -1)
            follower.slot.tokens[:] = leader.slot.tokens
            follower.cached = leader.cached
            follower.row = leader.row
            follower.leader = None
        leader.followers.clear()

    def _finish(
        self,
        active: _Active,
        events: list[tuple[int, Event]],
        *,
        reason: FinishReason = "stop",
        error: str | None = None,
        note: str | None = None,
        clear: bool = False,
    ) -> None:
        self._wait_for_room = False
        if error is not None:
            events.append((active.rid, ErrorEvent(error)))
            clear = True
        else:
            assert active.assembler is not None
            events.append(
                (
                    active.rid,
                    FinishEvent(
                        finish_reason=reason,
                        text=active.assembler.flush(),
                        prompt_tokens=len(active.request.prompt_tokens),
                        completion_tokens=active.generated,
                        cached_tokens=active.cached,
                        note=note,
                        index=active.index,
                    ),
                )
            )
        self._release(active, clear=clear)

    def _release(self, active: _Active, *, clear: bool) -> None:
        """The choice leaves its slot; ``clear`` also drops the slot's cache (else it stays for reuse)."""
        self._active.pop(active.key, None)
        for follower in active.followers:  # choices still waiting for this prompt cannot go on without it
            self._release(follower, clear=True)
        active.followers.clear()
        if active.sampler is not None:
            active.sampler.free()
            active.sampler = None
        slot = active.slot
        slot.active = None
        slot.last_used_s = time.monotonic()
        if clear:
            self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.tokens.clear()

    def _cancel(self, rid: int) -> None:
        choices = [a for a in self._active.values() if a.rid == rid]
        if choices:
            # The client is gone: its sequences and KV cells are freed now, not kept as a prefix cache.
            for active in choices:
                if active.key in self._active:  # releasing choice 0 already released those waiting for it
                    self._release(active, clear=True)
            self._wait_for_room = False
            return
        self._waiting = collections.deque(item for item in self._waiting if item[0] != rid)

    def _fail_all(self, message: str) -> None:
        events: list[tuple[int, Event]] = []
        for active in list(self._active.values()):
            self._finish(active, events, error=message)
        events.extend((rid, ErrorEvent(message)) for rid, _ in self._waiting)
        self._waiting.clear()
        if events:
            self._last_stats = self.stats()
            self._emit(events, None, self._last_stats)

    def stats_snapshot(self) -> EngineStats:
        """The accounting after the latest step; safe from any thread."""
        return self._last_stats

    def stats(self, *, check_cells: bool = True) -> EngineStats:
        """The accounting now; scheduler thread only. ``check_cells``: count the cells llama.cpp holds per
        sequence and report those the engine does not track; without it, the figure of the latest check."""
        lc = self._lc
        busy = cached = 0
        for slot in self._slots:
            if slot.active is None:
                cached += len(slot.tokens)
            else:
                busy += len(slot.tokens)
        if check_cells:
            held = 0
            for slot in self._slots:
                pos_max = lc.llama_memory_seq_pos_max(self._mem, slot.seq_id)
                if pos_max >= 0:
                    held += pos_max - lc.llama_memory_seq_pos_min(self._mem, slot.seq_id) + 1
            self._untracked = held - busy - cached
        return EngineStats(
            sequences=len(self._slots),
            busy_sequences=len(self._active),
            waiting_requests=len(self._waiting),
            kv_cells=self.facts.n_ctx,
            kv_cells_busy=busy,
            kv_cells_cached=cached,
            kv_cells_untracked=self._untracked,
            steps=self._steps,
        )


def _order(active: _Active) -> tuple[int, int]:
    """Admission order, then choice: the order of the prompt budget, of giving way and of sampling (the rows
    of a batch go in sequence-id order)."""
    return (active.admitted, active.index)
