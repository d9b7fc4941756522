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
