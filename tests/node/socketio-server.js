// A Socket.IO 4 match server for the end-to-end tests.
// usage: node socketio-server.js PORT SERVER_ID
// Clients with ?matchId=M join room M; "chat" is broadcast to the room.
// "echo" is answered through an acknowledgement (needs a sticky session).
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2]);
const id = process.argv[3];
const httpServer = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ healthy: true, server: id }));
    return;
  }
  res.writeHead(404);
  res.end();
});
const io = new Server(httpServer, { cors: { origin: true, credentials: true } });
io.on("connection", (socket) => {
  const room = socket.handshake.query.matchId;
  if (room) socket.join(room);
  socket.emit("hello", { server: id });
  socket.on("chat", (text) => {
    if (room) io.to(room).emit("chat", { from: socket.id, text, server: id });
  });
  socket.on("echo", (payload, ack) => ack({ payload, server: id, transport: socket.conn.transport.name }));
});
httpServer.listen(port, "127.0.0.1", () => console.log("ready " + id));
process.on("SIGTERM", () => process.exit(0));
