"""waiting_on names the await a task is suspended in, innermost frame first."""

import asyncio
import threading

from fedbus.telemetry.stacks import waiting_on


def test_waiting_on_shows_the_innermost_await_of_each_task_and_other_threads():
    release = threading.Event()

    def blocked_in_a_thread():
        release.wait(5)

    async def held_by_a_future(fut):
        await fut

    async def outer(fut):
        await held_by_a_future(fut)

    async def main():
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(outer(fut), name="holder")
        worker = threading.Thread(target=blocked_in_a_thread, name="blocked", daemon=True)
        worker.start()
        await asyncio.sleep(0.01)
        try:
            return waiting_on()
        finally:
            release.set()
            worker.join()
            task.cancel()

    lines = asyncio.run(main())
    holder = next(line for line in lines if line.startswith("task holder:"))
    assert holder.split(": ", 1)[1].startswith("held_by_a_future:") and "< outer:" in holder
    assert any(line.startswith("thread blocked:") and "blocked_in_a_thread" in line for line in lines)


def test_stop_tasks_is_bounded_even_if_a_task_swallows_its_cancellation():
    import time

    from fedbus.telemetry.stacks import stop_tasks

    async def stubborn():
        while True:  # like a client library's fetch that turns a cancel into a timeout
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def polite():
        await asyncio.sleep(10)

    async def main():
        tasks = [asyncio.create_task(stubborn(), name="stubborn"), asyncio.create_task(polite(), name="polite")]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await stop_tasks(tasks, timeout_s=0.3)
        took = time.monotonic() - started
        state = (tasks[0].done(), tasks[1].cancelled())
        tasks[0].get_coro().close() if not tasks[0].done() else None
        return took, state

    took, (stubborn_done, polite_cancelled) = asyncio.run(main())
    assert took < 2.0 and polite_cancelled and not stubborn_done
