// Socket.IO 4 clients with the default transports (long-polling, then the
// upgrade to WebSocket) against a proxy. Prints one JSON line of results.
// usage: node socketio-client.js URL MATCH_CLIENTS ROOMS LOBBY_CLIENTS
const { io } = require("socket.io-client");

const [url, matchClients, rooms, lobbyClients] = [
  process.argv[2],
  Number(process.argv[3]),
  Number(process.argv[4]),
  Number(process.argv[5]),
];
const deadline = setTimeout(() => finish("timeout"), 60000);
const result = { servers: {}, upgraded: 0, connected: 0, expected: 0, received: 0, echoes: 0, errors: [] };
const sockets = [];

function open(query) {
  return new Promise((resolve) => {
    // withCredentials keeps a cookie jar in Node, as a browser would
    const s = io(url, { query, withCredentials: true, reconnection: false, forceNew: true });
    sockets.push(s);
    let hello = null;
    let upgraded = false;
    const done = () => hello && upgraded && resolve({ s, server: hello.server });
    s.on("hello", (h) => { hello = h; done(); });
    s.io.engine.on("upgrade", () => { upgraded = true; result.upgraded++; done(); });
    s.on("connect_error", (e) => { result.errors.push("connect_error: " + e.message); resolve(null); });
    s.on("disconnect", (r) => { if (!finished) result.errors.push("disconnect: " + r); });
  });
}

let finished = false;
function finish(why) {
  if (finished) return;
  finished = true;
  clearTimeout(deadline);
  result.why = why;
  console.log(JSON.stringify(result));
  sockets.forEach((s) => s.close());
  setTimeout(() => process.exit(0), 100);
}

(async () => {
  const match = await Promise.all(
    Array.from({ length: matchClients }, (_, i) => open({ matchId: "room-" + (i % rooms) })),
  );
  const lobby = await Promise.all(Array.from({ length: lobbyClients }, () => open({})));
  const all = match.concat(lobby).filter(Boolean);
  result.connected = all.length;
  all.forEach((c) => (result.servers[c.server] = (result.servers[c.server] || 0) + 1));
  result.roomServers = {};
  match.forEach((c, i) => {
    if (!c) return;
    const room = "room-" + (i % rooms);
    (result.roomServers[room] = result.roomServers[room] || []).includes(c.server) ||
      result.roomServers[room].push(c.server);
  });

  // every match client says one thing; everyone in its room must hear it
  const perRoom = {};
  match.forEach((c, i) => (perRoom[i % rooms] = (perRoom[i % rooms] || 0) + 1));
  match.forEach((c, i) => { if (c) result.expected += perRoom[i % rooms]; });
  const heard = new Promise((resolve) => {
    if (result.expected === 0) resolve();
    match.forEach((c) => c && c.s.on("chat", () => { if (++result.received === result.expected) resolve(); }));
  });
  match.forEach((c, i) => c && c.s.emit("chat", "hi from " + i));

  // every lobby client needs its session to stay on one server
  const echoes = lobby.map((c) =>
    c && c.s.timeout(10000).emitWithAck("echo", "ping").then(
      (r) => { if (r.server === c.server && r.transport === "websocket") result.echoes++; },
      (e) => result.errors.push("echo: " + e.message),
    ),
  );
  await Promise.all([heard, ...echoes]);
  finish("done");
})();
