// A small KP5 match server on `ws`, meant to run behind kp5-proxy with a
// kp5-agent beside it (docs/agent-api.md):
//   - players connect to ws://PROXY/matches/<id>/ws; the proxy sends every
//     player of a match here while this server owns it
//   - the match's state lives in Redis through the agent: read when the
//     first player of a match arrives (so a server that takes a match over
//     after a failure continues where the old one stopped), written with
//     If-Match on every move, so a stale writer can never overwrite
//   - the live load is pushed to the agent (PUT /v1/load), so every proxy
//     balances on it
// usage: node server.js --id server-1 --port 3001 --agent http://127.0.0.1:9902
// messages from players: {"type":"move","player":"p1","move":"e4"}
// messages to players:   {"type":"state","version":N,"state":{...},"server":"server-1"}
"use strict";
const http = require("http");
const { WebSocketServer } = require("ws");

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : process.env[name.toUpperCase().replace(/-/g, "_")] || dflt;
};
const ID = arg("id", "server-1");
const PORT = Number(arg("port", "3001"));
const AGENT = arg("agent", "http://127.0.0.1:9902");

const matches = new Map(); // id -> { players: Set<ws>, version, state, loading }

async function agent(method, path, body, headers = {}) {
  const r = await fetch(AGENT + path, {
    method,
    headers: { "content-type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function reportLoad() {
  let connections = 0;
  for (const m of matches.values()) connections += m.players.size;
  try {
    await agent("PUT", "/v1/load", { connections, matches: matches.size });
  } catch (e) {
    console.error(`${ID}: load report failed: ${e.message}`);
  }
}

/** The match, with its state read from the agent once (404: a new match). */
async function open(id) {
  let m = matches.get(id);
  if (!m) {
    m = { players: new Set(), version: 0, state: { moves: [] } };
    m.loading = (async () => {
      const r = await agent("GET", `/v1/matches/${encodeURIComponent(id)}/state`);
      if (r.status === 200) {
        m.version = r.body.version;
        m.state = r.body.state;
        if (r.body.takenOver) console.log(`${ID}: took match ${id} over from ${r.body.previousOwner} at version ${m.version}`);
      } else if (r.status !== 404) {
        throw new Error(`reading state: ${r.status} ${JSON.stringify(r.body)}`);
      }
    })();
    matches.set(id, m);
  }
  await m.loading;
  return m;
}

/** Applies a move with a conditional write; on 409 re-reads and retries. */
async function move(id, m, mv) {
  for (let attempt = 0; attempt < 5; attempt++) {
    const next = { ...m.state, moves: [...(m.state.moves || []), mv] };
    const r = await agent("PUT", `/v1/matches/${encodeURIComponent(id)}/state`, next, { "if-match": `"${m.version}"` });
    if (r.status === 200) {
      m.version = r.body.version;
      m.state = r.body.state;
      return;
    }
    if (r.status !== 409) throw new Error(`writing state: ${r.status} ${JSON.stringify(r.body)}`);
    const cur = await agent("GET", `/v1/matches/${encodeURIComponent(id)}/state`);
    m.version = cur.body.version;
    m.state = cur.body.state;
  }
  throw new Error("too many concurrent writers");
}

function broadcast(id, m) {
  const msg = JSON.stringify({ type: "state", version: m.version, state: m.state, server: ID });
  for (const p of m.players) if (p.readyState === 1) p.send(msg);
}

const server = http.createServer((req, res) => {
  if (req.url === "/health") return res.end("ok");
  if (req.url === "/stats") {
    let connections = 0;
    for (const m of matches.values()) connections += m.players.size;
    res.setHeader("content-type", "application/json");
    return res.end(JSON.stringify({ connections, matches: matches.size }));
  }
  res.statusCode = 404;
  res.end("not found");
});
const wss = new WebSocketServer({ noServer: true });
server.on("upgrade", (req, socket, head) => {
  const found = /^\/matches\/([^/?]+)\/ws/.exec(req.url || "");
  if (!found) return socket.destroy();
  wss.handleUpgrade(req, socket, head, async (ws) => {
    const id = decodeURIComponent(found[1]);
    try {
      const m = await open(id);
      m.players.add(ws);
      reportLoad();
      ws.send(JSON.stringify({ type: "state", version: m.version, state: m.state, server: ID }));
      ws.on("message", async (data) => {
        try {
          const msg = JSON.parse(String(data));
          if (msg.type === "move") {
            await move(id, m, { player: msg.player, move: msg.move });
            broadcast(id, m);
          }
        } catch (e) {
          ws.send(JSON.stringify({ type: "error", error: e.message }));
        }
      });
      ws.on("close", () => {
        m.players.delete(ws);
        if (m.players.size === 0) matches.delete(id);
        reportLoad();
      });
    } catch (e) {
      console.error(`${ID}: match ${id}: ${e.message}`);
      ws.close(1011, "match state unavailable");
    }
  });
});
server.listen(PORT, "127.0.0.1", () => {
  console.log(`${ID}: listening on 127.0.0.1:${PORT}, agent ${AGENT}`);
  reportLoad();
});
