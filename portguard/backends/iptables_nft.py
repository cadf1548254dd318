"""The iptables-nft backend: the xtables tables Docker writes on modern hosts.

Reads only nat POSTROUTING and portguard's two chains (``iptables-nft -S CHAIN``: the nft cache is
filled for that chain alone, so the cost does not grow with the rest of the table), and
writes in one ``iptables-nft-restore --noflush`` batch, which is a single nf_tables
transaction.  The same class drives legacy binaries for tests of the text path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence

from portguard.backends import xtables
from portguard.backends.base import Observation, Watch
from portguard.errors import FatalError, RetryableError, UnfixableError
from portguard.rules import Family, Rule

__all__ = ["IptablesNftBackend"]

_TIMEOUT = 30.0
# iptables' exit status 4 is RESOURCE_PROBLEM: the xtables lock or the kernel was busy.
_EXIT_RESOURCE = 4


class IptablesNftBackend:
    name = "iptables-nft"

    def __init__(self, flavour: str = "nft", *, only: tuple[Family, ...] = tuple(Family)) -> None:
        self._flavour = flavour
        self._handled = only  # the families this object reads and writes
        self.name = f"iptables-{flavour}"
        # iptables-nft changes are nf_tables changes: notifications for table 'nat'; legacy ones notify nobody.
        self.watch = Watch(nf_tables=frozenset({b"nat"}), poll_legacy=False) if flavour == "nft" else Watch(
            nf_tables=None, poll_legacy=True)
        self._families: tuple[Family, ...] | None = None

    def families(self) -> tuple[Family, ...]:
        """IPv4 always; IPv6 when ip6tables can list a nat table here (kernels without IPv6 NAT cannot)."""
        if self._families is None:
            ok = [Family.IPV4]
            try:
                proc = self._run([self._tool(Family.IPV6), "-w", "5", "-t", "nat", "-S", xtables.POSTROUTING])
                if proc.returncode == 0:
                    ok.append(Family.IPV6)
            except FatalError:
                pass
            self._families = tuple(ok)
        return self._families

    def close(self) -> None:
        return

    def _tool(self, family: Family, suffix: str = "") -> str:
        base = "iptables" if family is Family.IPV4 else "ip6tables"
        return f"{base}-{self._flavour}{suffix}"

    def probe(self) -> None:
        missing = [t for t in (self._tool(Family.IPV4), self._tool(Family.IPV4, "-restore")) if not shutil.which(t)]
        if missing:
            raise FatalError(f"backend {self.name}: {', '.join(missing)} not found; install the 'iptables' package")

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
        except FileNotFoundError:
            raise FatalError(f"backend {self.name}: {argv[0]} not found; install the 'iptables' package") from None
        except subprocess.TimeoutExpired:
            raise RetryableError(f"{argv[0]} did not finish within {_TIMEOUT:.0f}s") from None

    def _list(self, family: Family, chain: str) -> list[xtables.XRule] | None:
        """Rules of one nat chain; None when the chain does not exist."""
        proc = self._run([self._tool(family), "-w", "5", "-t", "nat", "-S", chain])
        if proc.returncode == _EXIT_RESOURCE:
            raise RetryableError(f"{self._tool(family)}: {_first_line(proc.stderr)}")
        if proc.returncode != 0:
            if chain != xtables.POSTROUTING:
                # 1.8.9 says "incompatible" (older: "No chain/target/match") for a missing chain
                return None
            if "incompatible" in proc.stderr:
                # A rule written with nft directly (e.g. 'masquerade persistent') that iptables-nft cannot show.
                raise UnfixableError(
                    f"{self._tool(family)}: the nat table holds rules iptables-nft cannot read (written with nft "
                    "directly); portguard cannot tell what runs first there: use the nftables backend"
                )
            raise FatalError(f"{self._tool(family)} -t nat -S {chain}: {_first_line(proc.stderr)}")
        return [r for r in map(xtables.parse_rule, proc.stdout.splitlines()) if r is not None]

    def _assess(self, family: Family, rules: Sequence[Rule]) -> tuple[Observation, xtables.Plan]:
        postrouting = self._list(family, xtables.POSTROUTING) or []
        chain = self._list(family, xtables.CHAIN)
        late = self._list(family, xtables.LATE_CHAIN)
        return xtables.assess(self.name, rules, postrouting, chain, late)

    def render(self, rules: Sequence[Rule]) -> str:
        out = []
        for family, frules in xtables.by_family(rules).items():
            out.append(f"# {self._tool(family, '-restore')} --noflush")
            out.append(xtables.render_restore(frules, xtables.full_plan()))
        return "".join(line if line.endswith("\n") else line + "\n" for line in out)

    def observe(self, rules: Sequence[Rule]) -> Observation:
        grouped = xtables.by_family(rules)
        parts, plans = [], {}
        for family in self._handled:
            if family in grouped:
                obs, plan = self._assess(family, grouped[family])
                parts.append(obs)
            else:
                # A family no longer configured: what portguard owns there is stale.  Its chain
                # is only looked for when a jump to it is left (one read instead of two per sync);
                # `remove` finds an orphaned chain too.
                leftovers = self._leftovers(family)
                if leftovers is None:
                    continue
                plan = xtables.removal_plan(*leftovers)
                stale = [f"{family.value} POSTROUTING: {spec}" for spec in plan.delete_postrouting]
                stale += [f"{family.value} chain {xtables.CHAIN}"] if plan.drop_chain else []
                stale += [f"{family.value} chain {xtables.LATE_CHAIN}"] if plan.drop_late_chain else []
                parts.append(Observation(self.name, (), tuple(stale)))
            if not plan.empty:
                plans[family] = plan
        return xtables.merge(self.name, parts, plans)

    def _leftovers(self, family: Family) -> tuple[list[xtables.XRule], list[xtables.XRule] | None,
                                                  list[xtables.XRule] | None] | None:
        try:
            postrouting = self._list(family, xtables.POSTROUTING) or []
        except FatalError:
            return None  # e.g. IPv6 disabled in this kernel: nothing of ours can be there
        if not any(x.owned for x in postrouting):
            return None
        return postrouting, self._list(family, xtables.CHAIN), self._list(family, xtables.LATE_CHAIN)

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        # Reusing the plan from the observation is safe: deletes name full rule texts, so if
        # the table changed since, the batch fails whole (RetryableError) and nothing changes.
        source = seen if seen is not None and isinstance(seen.plan, dict) else self.observe(rules)
        plans: dict[Family, xtables.Plan] = source.plan if isinstance(source.plan, dict) else {}
        grouped = xtables.by_family(rules)
        for family, plan in plans.items():
            self._restore(family, xtables.render_restore(grouped.get(family, []), plan))

    def _restore(self, family: Family, batch: str) -> None:
        tool = self._tool(family, "-restore")
        proc = self._run([tool, "--noflush", "--wait"], stdin=batch)
        if proc.returncode == 0:
            return
        err = _first_line(proc.stderr)
        if "does a matching rule exist" in err or "does not exist" in err or "lock" in err.lower():
            # Lock busy, or the table changed between our read and our write: the batch was
            # rejected whole, nothing changed; read again and retry.
            raise RetryableError(f"{tool}: {err}")
        if any(k in err for k in ("Invalid argument", "Operation not supported", "Operation not permitted",
                                  "incompatible", "Too many links", "Device or resource busy")):
            # The kernel refused the batch (exit 4 too, RESOURCE_PROBLEM): e.g. a foreign '-A OUTPUT -j
            # PORTGUARD' makes every MASQUERADE in the chain invalid.  Writing again cannot help.
            raise UnfixableError(f"{tool}: the kernel refused portguard's batch: {err}")
        if proc.returncode == _EXIT_RESOURCE:
            raise RetryableError(f"{tool}: {err}")
        raise FatalError(f"{tool}: {err}")

    def _remove_family(self, family: Family) -> int:
        try:
            postrouting = self._list(family, xtables.POSTROUTING) or []
        except FatalError:
            return 0
        plan = xtables.removal_plan(postrouting, self._list(family, xtables.CHAIN),
                                    self._list(family, xtables.LATE_CHAIN))
        if plan.empty:
            return 0
        self._restore(family, xtables.render_restore([], plan))
        return len(plan.delete_postrouting) + plan.drop_chain + plan.drop_late_chain

    def remove(self) -> int:
        return sum(self._remove_family(f) for f in self._handled)


_BANNER = re.compile(r"^\S+ v[\d.]+ \([^)]*\):\s*$")


def _first_line(text: str) -> str:
    """The line that says what went wrong: not the '... v1.8.9 (nf_tables):' banner nor a comment."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#") and not _BANNER.match(ln)]
    return lines[0] if lines else "failed without a message"
