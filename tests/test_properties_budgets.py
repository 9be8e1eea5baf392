"""Property, over budgets of any scope: after any sequence of checks, records, releases,
lease expiries, plan assignments, grants and reloads, every counter equals the settled
costs plus the live reservations, never negative, and a check is allowed exactly when its
worst case fits every window of every budget that applies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from budgetguard import Usage

from .conftest import FrozenClock
from .helpers import MSG, config, cost_usd, guard, run_machine

USERS = ("ann", "ben")
TENANTS = ("acme", "globex")
TTL = 60  # reservation_ttl_s in the helpers' config
USER_CAP = Decimal("0.05")
PLANS = {"small": Decimal("0.03"), "big": Decimal("0.06")}
FEATURE_CAP = Decimal("0.04")
ORG_CAPS = (Decimal("0.08"), Decimal("0.07"))  # the two configs reloads switch between


def limits(org_cap: Decimal):
    return {"tiers": {"default": {"hourly_usd": str(USER_CAP)}}, "org": {"daily_usd": str(org_cap)},
            "budgets": {"tenant": {"per": "tenant", "default_plan": "small",
                                   "plans": {p: {"daily_usd": str(c)} for p, c in PLANS.items()}},
                        "feature": {"when": {"feature": "x"}, "daily_usd": str(FEATURE_CAP)}}}


def machine(url_factory):
    class Budgets(RuleBasedStateMachine):
        live = Bundle("live")

        def __init__(self) -> None:
            super().__init__()
            self.clock = FrozenClock(datetime(2026, 5, 1, 9, 0, tzinfo=UTC))
            self.org_cap = ORG_CAPS[0]
            # A key prefix of its own: each example starts from empty counters, on any backend.
            self.prefix = f"p{uuid.uuid4().hex[:12]}"
            self.g = guard(url_factory(), self.clock, key_prefix=self.prefix, **limits(self.org_cap))
            self.spent: dict[tuple[str, str | None], Decimal] = {}
            # rid -> (user, tenant, featured, amount, deadline)
            self.leases: dict[str, tuple[str, str, bool, Decimal, datetime]] = {}
            self.assigned: dict[str, str | None] = dict.fromkeys(TENANTS)
            self.grants: dict[str, list[tuple[Decimal, datetime]]] = {t: [] for t in TENANTS}

        # -- the model ---------------------------------------------------------------------

        def _live(self):
            return [v for v in self.leases.values() if v[4] > self.clock.now]

        def used(self, scope: str, value: str | None) -> Decimal:
            spent = self.spent.get((scope, value), Decimal(0))
            return spent + self.reserved(scope, value)

        def reserved(self, scope: str, value: str | None) -> Decimal:
            def holds(lease) -> bool:
                user, tenant, featured, _, _ = lease
                return {"user": user == value, "tenant": tenant == value, "feature": featured,
                        "org": True}[scope]
            return sum((lease[3] for lease in self._live() if holds(lease)), Decimal(0))

        def tenant_cap(self, tenant: str, plan: str | None) -> Decimal:
            base = PLANS[plan or self.assigned[tenant] or "small"]
            return base + sum((usd for usd, until in self.grants[tenant] if until > self.clock.now), Decimal(0))

        # -- rules ------------------------------------------------------------------------

        @rule(target=live, user=st.sampled_from(USERS), tenant=st.sampled_from(TENANTS), featured=st.booleans(),
              plan=st.sampled_from([None, None, "small", "big"]), max_tokens=st.sampled_from([1, 300, 900, 2000]))
        def check(self, user, tenant, featured, plan, max_tokens):
            tags = {"tenant": tenant, **({"feature": "x"} if featured else {})}
            d = self.g.check(user, "gpt-4o", MSG, max_tokens=max_tokens, tags=tags,
                             plans=None if plan is None else {"tenant": plan})
            amount = d.estimated_cost_usd
            assert d.budgets == ("user", "tenant", *(("feature",) if featured else ()), "org")
            blocks = {
                "user.hourly": self.used("user", user) + amount > USER_CAP,
                "tenant.daily": self.used("tenant", tenant) + amount > self.tenant_cap(tenant, plan),
                "feature.daily": featured and self.used("feature", None) + amount > FEATURE_CAP,
                "org.daily": self.used("org", None) + amount > self.org_cap,
            }
            assert d.allowed == (not any(blocks.values())), (blocks, d.reason)
            if not d.allowed:
                # The blocking window that resets last: the days outlast the hour, and among
                # days the later budget (tenant, feature, org in order) is named.
                order = ["user.hourly", "tenant.daily", "feature.daily", "org.daily"]
                assert d.limit == [name for name in order if blocks[name]][-1]
                return multiple()
            self.leases[d.reservation_id] = (user, tenant, featured, amount, self.clock.now + timedelta(seconds=TTL))
            return d

        @rule(d=consumes(live), inp=st.integers(0, 5000), out=st.integers(0, 3000))
        def record(self, d, inp, out):
            assert self.g.record(d, Usage(input_tokens=inp, output_tokens=out)) is True
            user, tenant, featured, _, _ = self.leases.pop(d.reservation_id)
            cost = cost_usd("gpt-4o", inp, out)
            for key in (("user", user), ("tenant", tenant), ("org", None)) + ((("feature", None),) if featured else ()):
                self.spent[key] = self.spent.get(key, Decimal(0)) + cost

        @rule(d=consumes(live))
        def release(self, d):
            assert self.g.release(d) is True
            self.leases.pop(d.reservation_id)

        @rule(tenant=st.sampled_from(TENANTS), plan=st.sampled_from([None, "small", "big"]))
        def assign(self, tenant, plan):
            self.g.admin.assign("tenant", tenant, plan)
            self.assigned[tenant] = plan

        @rule(tenant=st.sampled_from(TENANTS), usd=st.sampled_from([Decimal("0.01"), Decimal("0.02")]),
              seconds=st.integers(1, 120))
        def grant(self, tenant, usd, seconds):
            until = self.clock.now + timedelta(seconds=seconds)
            self.g.admin.grant("tenant", tenant, usd, "daily", until)
            self.grants[tenant].append((usd, until))

        @rule()
        def reload(self):
            self.org_cap = ORG_CAPS[1] if self.org_cap == ORG_CAPS[0] else ORG_CAPS[0]
            self.g.reload(config(key_prefix=self.prefix, **limits(self.org_cap)))

        @rule(seconds=st.integers(1, 90))
        def advance(self, seconds):
            if self.clock.now + timedelta(seconds=seconds) < datetime(2026, 5, 1, 9, 59, tzinfo=UTC):
                self.clock.advance(seconds=seconds)

        @invariant()
        def counters_match_the_ledger(self):
            for user in USERS:
                w = self.g.status(user).windows["user.hourly"]
                assert (w.spent_usd, w.reserved_usd) == (self.spent.get(("user", user), 0),
                                                         self.reserved("user", user))
            for tenant in TENANTS:
                st_ = self.g.budget_status("tenant", tenant)
                w = st_.windows["tenant.daily"]
                assert (w.spent_usd, w.reserved_usd) == (self.spent.get(("tenant", tenant), 0),
                                                         self.reserved("tenant", tenant))
                assert w.limit_usd == self.tenant_cap(tenant, None)
            w = self.g.budget_status("feature").windows["feature.daily"]
            assert (w.spent_usd, w.reserved_usd) == (self.spent.get(("feature", None), 0),
                                                     self.reserved("feature", None))
            w = self.g.budget_status("org").windows["org.daily"]
            assert (w.spent_usd, w.reserved_usd) == (self.spent.get(("org", None), 0), self.reserved("org", None))
            assert w.reserved_usd >= 0 and w.limit_usd == self.org_cap

        def teardown(self) -> None:
            self.g.close()

    return Budgets


# Each example has a key prefix of its own: no flushing between them.
def test_budgets_on_fakeredis():
    run_machine(machine(lambda: f"memory://prop-{uuid.uuid4().hex}"), 40)


def test_budgets_on_real_redis(real_redis_url):
    run_machine(machine(lambda: real_redis_url), 40)


def test_budgets_on_a_cluster(cluster_url):
    run_machine(machine(lambda: cluster_url), 15, steps=25)
