"""The demo's stand-in for a person at a browser: approve one device login.

Reads the verification URL `meshssh login` printed, opens the form like a browser (cookie
and hidden CSRF field included), signs in with the demo user's email and password, and
presses Approve. Only the demo uses it; a real user opens the URL themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

import aiohttp

CSRF = re.compile(r'name="csrf_token"\s+value="([^"]+)"')


async def approve(url: str, email: str, password: str) -> None:
    # unsafe=True: aiohttp keeps no cookies for IP-address hosts otherwise.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(url) as resp:
            page = await resp.text()
        match = CSRF.search(page)
        if not match:
            sys.exit("demo: the verification page has no form")
        code = re.search(r"user_code=([A-Z-]+)", url)
        form = {
            "csrf_token": match.group(1), "user_code": code.group(1) if code else "",
            "email": email, "password": password, "action": "approve",
        }
        async with browser.post(url.split("?")[0], data=form) as resp:
            if resp.status != 200:
                sys.exit(f"demo: approval failed with HTTP {resp.status}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("email")
    ap.add_argument("password_file")
    args = ap.parse_args()
    with open(args.password_file) as f:
        password = f.read().strip()
    asyncio.run(approve(args.url, args.email, password))


if __name__ == "__main__":
    main()
