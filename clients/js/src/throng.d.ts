// Types for throng.js: the `throng/3` wire protocol and a WebTransport session.
// u64 fields are JS numbers; a decoded u64 above Number.MAX_SAFE_INTEGER is
// refused as Malformed.

export declare const DEFAULT_MAX_FRAME_BYTES: 65536;
export declare const HARD_MAX_FRAME_BYTES: 16777216;

// ----------------------------------------------------------------- errors --

export declare const ErrorCode: Readonly<{
  Malformed: 1;
  FrameTooLarge: 2;
  UnexpectedFrame: 3;
  Unauthenticated: 10;
  TokenExpired: 11;
  TokenInvalid: 12;
  TokenMalformed: 13;
  UnknownTenant: 14;
  AlgorithmNotAllowed: 15;
  Forbidden: 20;
  TooManyRooms: 21;
  NotJoined: 22;
  BadRoomName: 23;
  BodyTooLarge: 24;
  TooSlow: 25;
  QueryTooLarge: 26;
  RoomFull: 27;
  RoomLimit: 28;
  SeqOutOfRange: 29;
  RateLimited: 30;
  StorageFull: 31;
  ServerBusy: 40;
  ShuttingDown: 41;
  Disconnected: 42;
  Filtered: 50;
  FilterUnavailable: 51;
  Internal: 99;
}>;

export type ErrorCodeName = keyof typeof ErrorCode;

/**
 * A ThrongError's codeName: an ErrorCode name; 'ConnectFailed' (code 0) when
 * the transport failed or timed out; 'Closed' (code 0) after close(); or
 * 'Unknown' for a code this version does not know.
 */
export type CodeName = ErrorCodeName | 'ConnectFailed' | 'Closed' | 'Unknown';

/** Where an error arose. */
export type ErrorWhere = 'connect' | 'session' | 'join' | 'send' | 'presence' | 'refresh' | 'decode' | 'encode';

/** ErrorCode's name for `code`; 'ConnectFailed' for 0; 'Unknown' otherwise. */
export declare function errorName(code: number): ErrorCodeName | 'ConnectFailed' | 'Unknown';

/** Whether an Error frame with `code` ends the connection (unknown codes: true). */
export declare function isFatal(code: number): boolean;

export declare class ThrongError extends Error {
  constructor(
    code: number,
    reason: string,
    options?: { where?: ErrorWhere; fatal?: boolean; codeName?: CodeName; room?: string; clientMsgId?: number },
  );
  /** The edge's code; 0 when there is none (transport failure, local close). */
  readonly code: number;
  readonly codeName: CodeName;
  /** Whether the connection is over because of it. */
  readonly fatal: boolean;
  readonly where: ErrorWhere;
  /** The edge's text, or what went wrong locally. */
  readonly reason: string;
  /** Set on join refusals. */
  readonly room?: string;
  /** Set on send rejections. */
  readonly clientMsgId?: number;
}

/** Bytes that are not a valid frame: code 1 (Malformed) or 2 (FrameTooLarge). */
export declare class DecodeError extends ThrongError {
  constructor(code: 1 | 2, reason: string);
  readonly code: 1 | 2;
}

/** A frame over the frame limit (code 2, FrameTooLarge); nothing was sent. */
export declare class EncodeError extends ThrongError {
  constructor(reason: string);
  readonly code: 2;
}

// ----------------------------------------------------------------- frames --

export type Kind = 'chat' | 'like' | 'gift' | 'host' | 'system';
export type Role = 'viewer' | 'host' | 'moderator';

export interface Message {
  /** Per-room, increasing; gaps are messages a policy did not deliver. */
  seq: number;
  sender: string;
  kind: Kind;
  body: Uint8Array;
}

export interface Session {
  tenant: string;
  user: string;
  role: Role;
}

export interface Limits {
  maxFrameBytes: number;
  maxBodyBytes: number;
  maxRooms: number;
  sendRatePerSec: number;
  sendBurst: number;
  idleTimeoutMs: number;
}

export interface GiftCount {
  gift: string;
  count: number;
}

export interface Counters {
  likes: number;
  gifts: GiftCount[];
}

export interface Welcome {
  type: 'Welcome';
  session: Session;
  limits: Limits;
  /** Seconds since the Unix epoch. */
  expiresAt: number;
}

/** What became of a join's resumeFrom. */
export type Resumed =
  | { kind: 'Fresh' }
  /** Everything the room delivered after the number follows. */
  | { kind: 'Continued' }
  /** Same numbering, but the edge no longer held all of it: messages may be lost, uncounted. */
  | { kind: 'Truncated' }
  /** The number was of another numbering (`previous`): what was said between is unknown. */
  | { kind: 'NewEpoch'; previous: number };

export interface Joined {
  type: 'Joined';
  room: string;
  online: number;
  recent: Message[];
  /** The room's numbering: sequence numbers compare only within one epoch. */
  epoch: number;
  resumed: Resumed;
}

export interface Batch {
  type: 'Batch';
  room: string;
  tick: number;
  messages: Message[];
  counters: Counters;
  /** Sequence numbers (of `messages`) to pin. */
  pinned: number[];
  online: number;
  /** Batches not received because this viewer fell behind. */
  missed: number;
  /** The numbering of `messages`; a change means another edge took the room over. */
  epoch: number;
}

export interface Ack {
  type: 'Ack';
  clientMsgId: number;
  seq: number;
  /** The numbering `seq` is of (the room's `epoch` when it acked). */
  epoch: number;
}

export interface Rejected {
  type: 'Rejected';
  clientMsgId: number;
  code: number;
  reason: string;
}

export interface EdgeError {
  type: 'Error';
  code: number;
  text: string;
}

export interface Pong {
  type: 'Pong';
  nonce: number;
}

export interface JoinRefused {
  type: 'JoinRefused';
  room: string;
  code: number;
  text: string;
}

export interface PresenceAnswer {
  type: 'Presence';
  queryId: number;
  online: boolean[];
}

export interface PresenceRefused {
  type: 'PresenceRefused';
  queryId: number;
  code: number;
  text: string;
}

export interface Refreshed {
  type: 'Refreshed';
  expiresAt: number;
}

export interface RefreshRefused {
  type: 'RefreshRefused';
  code: number;
  text: string;
}

/** Edge → client. */
export type EdgeFrame =
  | Welcome
  | Joined
  | Batch
  | Ack
  | Rejected
  | EdgeError
  | Pong
  | JoinRefused
  | PresenceAnswer
  | PresenceRefused
  | Refreshed
  | RefreshRefused;

export interface Hello {
  type: 'Hello';
  token: string;
}

export interface Join {
  type: 'Join';
  room: string;
  /** null (or, when encoding, absent) joins without resuming. */
  resumeFrom: number | null;
  /** The numbering resumeFrom is of (0: the room's current one). */
  epoch: number;
}

export interface Leave {
  type: 'Leave';
  room: string;
}

export interface Send {
  type: 'Send';
  room: string;
  kind: Kind;
  body: Uint8Array;
  clientMsgId: number;
}

export interface Ping {
  type: 'Ping';
  nonce: number;
}

export interface PresenceQuery {
  type: 'Presence';
  queryId: number;
  users: string[];
}

export interface Seen {
  type: 'Seen';
  room: string;
  seq: number;
}

export interface Refresh {
  type: 'Refresh';
  token: string;
}

/** Client → edge. */
export type ClientFrame = Hello | Join | Leave | Send | Ping | PresenceQuery | Seen | Refresh;

/** Encodes with the 4-byte length prefix; EncodeError if the payload exceeds the limit. */
export declare function encodeClientFrame(frame: ClientFrame, maxFrameBytes?: number): Uint8Array;
/** What the edge sends, for tests and tools. */
export declare function encodeEdgeFrame(frame: EdgeFrame, maxFrameBytes?: number): Uint8Array;
/** Decodes a payload (no prefix) using every byte; DecodeError otherwise. */
export declare function decodeEdgeFrame(payload: Uint8Array): EdgeFrame;
export declare function decodeClientFrame(payload: Uint8Array): ClientFrame;

/**
 * Splits a stream into EdgeFrames; holds at most one partial frame besides
 * the chunk pushed. Throws DecodeError, and the same error ever after.
 */
export declare class FrameReader {
  constructor(maxFrameBytes?: number);
  push(chunk: Uint8Array): EdgeFrame[];
  /** Throws Malformed if the stream ended inside a frame. */
  finish(): void;
}

// ---------------------------------------------------------------- session --

export interface CloseInfo {
  code: number;
  codeName: CodeName;
  reason: string;
  /** False only after close(). */
  fatal: boolean;
}

/** A certificate's SHA-256 digest: base64 (or base64url), 64 hex digits, or 32 bytes. */
export type CertHash = string | Uint8Array;

/** The parts of the WebTransport API the client uses. */
export interface WebTransportLike {
  readonly ready: Promise<unknown>;
  readonly closed: Promise<{ closeCode?: number; reason?: string } | undefined>;
  close(info?: { closeCode?: number; reason?: string }): void;
  createBidirectionalStream(): Promise<{ readable: ReadableStream<Uint8Array>; writable: WritableStream<Uint8Array> }>;
  readonly incomingUnidirectionalStreams: ReadableStream<ReadableStream<Uint8Array>>;
}

export type WebTransportConstructor = new (
  url: string,
  options?: { serverCertificateHashes?: { algorithm: 'sha-256'; value: Uint8Array }[] },
) => WebTransportLike;

export interface ConnectOptions {
  /** The edge's WebTransport URL, https://host:port/path. */
  url: string;
  /** The JWT. */
  token: string;
  /** For an edge with a self-signed certificate (at most 14 days valid). */
  certHashes?: CertHash | CertHash[];
  /** Default 10000. */
  connectTimeoutMs?: number;
  /** Default globalThis.WebTransport. */
  WebTransport?: WebTransportConstructor;
}

export interface JoinOptions {
  /** Ask for what the edge still has after this sequence number. */
  resumeFrom?: number | null;
  /** The numbering resumeFrom is of (default 0: the room's current one). */
  epoch?: number;
  /** Batches kept for `for await` when the consumer is slow (default 1024; 0: events only). */
  buffer?: number;
}

export interface RoomEventMap {
  batch: CustomEvent<Batch>;
  /** null: the edge finished the stream (after leave); otherwise why it broke. */
  end: CustomEvent<ThrongError | null>;
}

/** A joined room. Batches arrive as 'batch' events and through `for await`. */
export declare class Room extends EventTarget implements AsyncIterable<Batch> {
  private constructor();
  readonly room: string;
  /** Members online: from Joined, then from each batch. */
  online: number;
  /** What Joined carried (after resumeFrom, if given). */
  readonly recent: Message[];
  /** The room's numbering. */
  readonly epoch: number;
  /** What became of the join's resumeFrom. */
  readonly resumed: Resumed;
  /** Resolves when the stream ends: null after a leave, or the ThrongError that ended it. */
  readonly ended: Promise<ThrongError | null>;
  /**
   * Yields batches; a batch after dropped ones (consumer slower than the
   * buffer) counts them in `missed`. Ends after a leave, throws the
   * ThrongError that broke the stream otherwise.
   */
  [Symbol.asyncIterator](): AsyncGenerator<Batch, void, undefined>;
  addEventListener<K extends keyof RoomEventMap>(
    type: K,
    listener: (event: RoomEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}

export interface ClientEventMap {
  /** A non-fatal Error frame (e.g. NotJoined, SeqOutOfRange). */
  error: CustomEvent<ThrongError>;
  close: CustomEvent<CloseInfo>;
}

export declare class ThrongClient extends EventTarget {
  private constructor();
  /** Resolves after Welcome; rejects with a ThrongError (the edge's code, or 0 'ConnectFailed'). */
  static connect(options: ConnectOptions): Promise<ThrongClient>;
  readonly session: Session;
  readonly limits: Limits;
  /** Seconds since the Unix epoch; refresh() moves it. */
  readonly expiresAt: number;
  readonly closed: Promise<CloseInfo>;
  /** Resolves when the room's stream delivered Joined; rejects with a ThrongError on JoinRefused. */
  join(room: string, options?: JoinOptions): Promise<Room>;
  /** A string body is sent as UTF-8. Rejects with a ThrongError (clientMsgId set) on Rejected. */
  send(room: string, kind: Kind, body: string | Uint8Array | ArrayBuffer | ArrayBufferView): Promise<{ clientMsgId: number; seq: number; epoch: number }>;
  /** online[i] is whether users[i] is online on the edge. */
  presence(users: string[]): Promise<boolean[]>;
  /** Round-trip time in milliseconds. */
  ping(): Promise<number>;
  /** Resolves with the new expiresAt; rejects with a ThrongError on RefreshRefused. */
  refresh(token: string): Promise<number>;
  leave(room: string): void;
  seen(room: string, seq: number): void;
  close(): void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}

// --------------------------------------------------------------- resuming --

export type ResumingStatus = 'idle' | 'connecting' | 'live' | 'reconnecting' | 'closed';

export interface ResumingRoomOptions {
  /** Called before every connection attempt (certificate hashes rotate). */
  getOptions: () => Promise<ConnectOptions> | ConnectOptions;
  room: string;
  /** Hand out only messages after this sequence number. */
  resumeFrom?: number | null;
  /** The numbering resumeFrom is of (default 0: the room's current one). */
  epoch?: number;
  /** Default 100; doubles up to maxBackoffMs. */
  firstBackoffMs?: number;
  /** Default 2000. */
  maxBackoffMs?: number;
  /** Give up when the room has been unreachable this long (default 60000). */
  giveUpAfterMs?: number;
}

export interface Gap {
  /** NewEpoch: the room's numbering changed (a restart, a takeover). Truncated: the edge no longer held all after afterSeq. */
  kind: 'NewEpoch' | 'Truncated';
  fromEpoch: number;
  toEpoch: number;
  /** The last sequence number handed out before the gap (of fromEpoch). */
  afterSeq: number | null;
}

export interface ResumingRoomEventMap {
  /** Messages never repeat; a rejoin's recent messages come first as a batch of tick 0. */
  batch: CustomEvent<Batch>;
  /** Messages may be lost here, uncounted; comes before the batches after it. */
  gap: CustomEvent<Gap>;
  status: CustomEvent<ResumingStatus>;
  /**
   * The error that stopped the room (status turns 'closed' next), or a
   * non-fatal Error frame of the current connection. A TypeError when the
   * options from getOptions() are unusable.
   */
  error: CustomEvent<ThrongError | TypeError>;
}

/**
 * A room that survives dropped connections: reconnects (after ShuttingDown,
 * ServerBusy, Internal, TooSlow or a transport failure) with exponential
 * backoff and resumes after the last sequence number it handed out. Stops on
 * anything else (token errors, Disconnected, Forbidden, ...).
 */
export declare class ResumingRoom extends EventTarget {
  constructor(options: ResumingRoomOptions);
  readonly room: string;
  readonly lastSeq: number | null;
  /** The numbering lastSeq is of. */
  readonly epoch: number;
  readonly reconnects: number;
  /** Gaps met so far. */
  readonly gaps: number;
  readonly status: ResumingStatus;
  /** The current connection, or null while there is none. */
  readonly client: ThrongClient | null;
  start(): void;
  /** Sends through the current connection; rejects with a ThrongError when there is none. */
  send(kind: Kind, body: string | Uint8Array | ArrayBuffer | ArrayBufferView): Promise<{ clientMsgId: number; seq: number; epoch: number }>;
  stop(): void;
  addEventListener<K extends keyof ResumingRoomEventMap>(
    type: K,
    listener: (event: ResumingRoomEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}
