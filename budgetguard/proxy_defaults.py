"""The proxy's read deadlines, apart from budgetguard.serving so that the command line can
show them without importing uvicorn (an extra, and slow to import)."""

from __future__ import annotations

#: A request head is a few hundred bytes; even a slow link delivers it in one round trip.
DEFAULT_HEADER_TIMEOUT = 10.0
#: Generous for a client pausing mid-upload (a GC pause, a congested link), short enough
#: that a stalled client does not sit on its socket and task.
DEFAULT_BODY_IDLE_TIMEOUT = 30.0
#: The largest body the proxy accepts (16 MiB) at about 55 KB/s: a drip-fed body that keeps
#: making just enough progress to dodge the idle timeout is cut here.
DEFAULT_BODY_TOTAL_TIMEOUT = 300.0
#: uvicorn's own default for the gap between requests on a kept-alive connection.
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
